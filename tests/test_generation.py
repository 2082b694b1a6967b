"""Decoding with a key/value cache, scoring and sampling, on randomly initialised tiny models:
cached decoding gives the logits of full recomputation token by token in every model family,
sharded generation equals one-device generation, and a scored document's mean negative
log-probability is its training loss."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from nmm_jax import sharding
from nmm_jax.data import shards
from nmm_jax.data.features import document_pieces
from nmm_jax.data.images import decode, eval_view
from nmm_jax.data.records import decode_document
from nmm_jax.data.stages import ShardedRecords
from nmm_jax.eval import held_out
from nmm_jax.eval import sequences as seq_lib
from nmm_jax.eval.inference import InferenceModel, inference_model_config, sample_next
from nmm_jax.models import NMM
from nmm_jax.train.loss import losses_from_sums
from nmm_jax.train.step import make_eval_step

VARIANTS = {
    "early": {},
    "late": {"model.fusion": "late"},
    "late_internal_add": {"model.fusion": "late", "model.vision_fusion": "internal_add",
                          "model.vision_layers": (0, -1), "model.fusion_decoder_layers": (1,)},
    "late_internal_xattn": {"model.fusion": "late", "model.vision_fusion": "internal_xattn",
                            "model.vision_layers": (0, -1), "model.fusion_decoder_layers": (1,)},
    "moe_top2_every2": {"model.moe.num_experts": 4, "model.moe.top_k": 2, "model.moe.every": 2},
    "moe_modality_capacity": {"model.moe.num_experts": 4, "model.moe.routing": "modality",
                              "model.moe.capacity_factor": 0.5},
}


class _Tokenizer:
  """Special ids only: these tests build token ids directly."""
  pad_id, bos_id, eos_id, image_id, image_start_id, image_end_id = 0, 1, 2, 3, 4, 5
  non_text_ids = (0, 3, 4, 5)

  def __init__(self, vocab_size=128):
    self.vocab_size = vocab_size

  def decode(self, ids):
    return " ".join(str(i) for i in ids)


def _model(config, seed=1):
  model = NMM(inference_model_config(config.model), rngs=nnx.Rngs(seed))
  if config.model.vision_fusion == "internal_xattn":
    for block in model.fusion_blocks:  # zero-initialised gates would hide the cross-attention
      block.gate.set_value(jnp.ones((1,)))
  return model


def _prompts(config, rng):
  """Three prompts of different lengths: one image, two images, text only."""
  patches = (config.data.image_size // config.model.patch_size) ** 2
  size = config.data.image_size
  return [seq_lib.build_sequence(_Tokenizer, rng.integers(0, 256, (n, size, size, 3)),
                                 rng.integers(6, 100, t), patches)
          for n, t in ((1, 3), (2, 1), (0, 5))]


def _extended(sequence, new_ids):
  extra = np.full(len(new_ids), -1, np.int32)
  return seq_lib.Sequence(np.concatenate([sequence.tokens, new_ids]).astype(np.int32),
                          np.concatenate([sequence.image_ids, extra]),
                          np.concatenate([sequence.patch_ids, extra]), sequence.images)


def _right_padded(sequences, image_size):
  """The training layout: each row's tokens first, padding (segment 0) after; (batch, index
  of each row's last token)."""
  left = seq_lib.prompt_batch(sequences, _Tokenizer, image_size)
  lengths = np.asarray([len(s.tokens) for s in sequences])
  right = {k: v for k, v in left.items() if k == "images"}
  for key in ("tokens", "segment_ids", "positions", "image_ids", "patch_ids"):
    right[key] = np.stack([np.roll(row, n) for row, n in zip(left[key], lengths)])
  return right, lengths - 1


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decoding_equals_full_recomputation(variant):
  config = tiny_config(**VARIANTS[variant])
  model = _model(config)
  sequences = _prompts(config, np.random.default_rng(0))
  steps, size = 4, config.data.image_size
  prompt = seq_lib.prompt_batch(sequences, _Tokenizer, size)
  prefill = nnx.jit(lambda m, p: m.prefill(p, p["tokens"].shape[1] + steps))
  decode = nnx.jit(lambda m, t, s: m.decode(t, s))
  full_logits = nnx.jit(lambda m, b: m.logits(b))
  logits_BxV, state = prefill(model, prompt)
  generated = np.zeros((len(sequences), 0), np.int32)
  for _ in range(steps):
    full, last_B = _right_padded([_extended(s, g) for s, g in zip(sequences, generated)], size)
    np.testing.assert_allclose(logits_BxV, full_logits(model, full)[np.arange(3), last_B],
                               atol=2e-5, rtol=1e-5)
    token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    generated = np.concatenate([generated, np.asarray(token_B)[:, None]], axis=1)
    logits_BxV, state = decode(model, token_B, state)
  if config.model.fusion == "late" and config.model.vision_fusion != "none":
    # The decoded tokens see the image through the fusion path: other pixels, other logits.
    changed = dict(prompt, images=255 - prompt["images"])
    other_BxV, other_state = prefill(model, changed)
    other_BxV, _ = decode(model, token_B, other_state)
    assert float(jnp.max(jnp.abs(other_BxV - logits_BxV))) > 1e-3


def test_generate_is_greedy_recomputation_and_shards_alike():
  """InferenceModel.generate (the jitted scan) picks the argmax of full recomputation at every
  step, and an MoE model sharded over data x expert generates the same tokens."""
  config = tiny_config(**VARIANTS["moe_top2_every2"])
  model = _model(config)
  _, params = nnx.split(model)
  tokenizer = _Tokenizer(config.model.vocab_size)
  sequences = _prompts(config, np.random.default_rng(3)) * 3  # 9 rows: batch padding too
  single = InferenceModel(config, params, tokenizer)
  outputs = single.generate(sequences, 5, batch_size=4)
  full_logits = nnx.jit(lambda m, b: m.logits(b)[:, -1])
  longest = max(len(s.tokens) for s in sequences) + 5
  for s, out in zip(sequences[:3], outputs):
    ids = []
    for _ in range(5):
      batch = seq_lib.prompt_batch([_extended(s, np.asarray(ids, np.int32))], _Tokenizer,
                                   config.data.image_size, longest)  # one shape, one compile
      logits = np.array(full_logits(model, batch))[0]
      logits[~single._allowed_V] = -np.inf
      ids.append(int(np.argmax(logits)))
      if ids[-1] == tokenizer.eos_id:
        break
    assert out.ids == [i for i in ids if i != tokenizer.eos_id]
    first = seq_lib.prompt_batch([s], _Tokenizer, config.data.image_size, longest)
    np.testing.assert_allclose(out.logprobs[0],
                               jax.nn.log_softmax(full_logits(model, first))[0, ids[0]],
                               atol=1e-5)
  assert [o.ids for o in outputs[3:]] == [o.ids for o in outputs[:3]] * 2

  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 1, "expert": 4})
  shardings = sharding.param_shardings(nnx.state(model), config.sharding_rules, mesh)
  sharded = InferenceModel(config, jax.device_put(params, shardings), tokenizer, mesh)
  assert [o.ids for o in sharded.generate(sequences, 5, batch_size=4)] == [o.ids for o in outputs]


def test_sampling_follows_temperature_and_top_p():
  logits_BxV = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
  allowed = jnp.ones(4, bool)
  key = jax.random.key(0)
  greedy = sample_next(logits_BxV, key, allowed, 0.0, 1.0)
  assert set(np.asarray(greedy).tolist()) == {0}
  # top_p 0.7: the nucleus is {0, 1} (mass before token 2 is 0.8 >= 0.7), renormalised 5:3.
  nucleus = np.asarray(sample_next(logits_BxV, key, allowed, 1.0, 0.7))
  assert set(nucleus.tolist()) == {0, 1}
  assert abs(np.mean(nucleus == 0) - 0.5 / 0.8) < 0.03
  plain = np.asarray(sample_next(logits_BxV, key, allowed, 1.0, 1.0))
  np.testing.assert_allclose(np.bincount(plain, minlength=4) / len(plain),
                             [0.5, 0.3, 0.15, 0.05], atol=0.03)
  # Temperature 0.5 squares the probabilities (renormalised); banned tokens never appear.
  hot = np.asarray(sample_next(logits_BxV, key, jnp.asarray([False, True, True, True]), 0.5, 1.0))
  expected = np.asarray([0, 0.09, 0.0225, 0.0025]) / 0.115
  np.testing.assert_allclose(np.bincount(hot, minlength=4) / len(hot), expected, atol=0.03)


def test_score_equals_the_training_loss(shapes_data_dir):
  """A held-out caption document scored with <eos> gives, as a mean negative log-probability,
  the loss the eval step computes on the same document packed into a training row."""
  config = tiny_config(**{"data.dir": shapes_data_dir})
  tokenizer = shards.load_tokenizer(config, shapes_data_dir)
  graphdef, params = nnx.split(NMM(config.model, rngs=nnx.Rngs(4)))
  example = held_out.caption_examples(shapes_data_dir, "caption", config.data.image_size, 1)[0]
  model = InferenceModel(config, params, tokenizer)
  ids, logprobs = model.score([model.sequence(example.image[None], example.caption, eos=True)])[0]
  assert ids[-1] == tokenizer.eos_id and tokenizer.decode(ids) == example.caption

  records = ShardedRecords(shards.shard_paths(os.path.join(shapes_data_dir, "caption"), "eval"))
  where, raw = records[0]
  assert where == example.where
  doc = decode_document(raw)  # the same document, through the training features
  size = config.data.image_size
  [piece] = document_pieces(doc, tokenizer, 0, patches_per_image=(size // 4) ** 2,
                            image_size=size, seq_len=config.data.seq_len, max_images=1,
                            image_view=lambda encoded: eval_view(decode(encoded), size))
  row = {k: np.zeros((1, config.data.seq_len), v.dtype) for k, v in piece.items()
         if k != "images"}
  for key in ("image_ids", "patch_ids", "source"):
    row[key] -= 1
  n = len(piece["tokens"])
  for key in row:
    row[key][0, :n] = piece[key]
  row["segment_ids"] = (np.arange(config.data.seq_len) < n).astype(np.int32)[None]
  row["positions"] = np.where(row["segment_ids"] > 0, np.arange(config.data.seq_len), 0)
  row["images"] = piece["images"][None]
  sums = make_eval_step(graphdef, 3, config.train.loss_chunk)(params, row)
  loss = losses_from_sums(jax.device_get(sums), ["caption", "interleaved", "text"])["loss"]
  np.testing.assert_allclose(-logprobs.mean(), loss, rtol=1e-5)
