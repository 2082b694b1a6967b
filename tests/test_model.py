"""The attention mask as seen from the logits, and the parameter count against scaling/flops.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_config, model_param_count, tiny_config
from nmm_jax.models import NMM
from nmm_jax.scaling import flops

L, P = 48, 16  # sequence length; patches per image in the tiny config (16px / 4px)


def _two_document_batch():
  """Doc 1 (positions 0..29): 3 text, an image (16 patches at 4..19), text. Doc 2: text only."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(7, 40, size=(1, L)).astype(np.int32)
  segment_ids = np.array([[1] * 30 + [2] * 14 + [0] * 4], np.int32)
  positions = np.array([list(range(30)) + list(range(14)) + [0] * 4], np.int32)
  image_ids = np.full((1, L), -1, np.int32)
  patch_ids = np.full((1, L), -1, np.int32)
  image_ids[0, 4:4 + P] = 0
  patch_ids[0, 4:4 + P] = np.arange(P)
  tokens[0, 4:4 + P] = 3
  images = rng.integers(0, 256, size=(1, 2, 16, 16, 3)).astype(np.uint8)
  return dict(tokens=tokens, segment_ids=segment_ids, positions=positions, image_ids=image_ids,
              patch_ids=patch_ids, images=images)


@pytest.fixture(scope="module", params=["xla", "flash"])
def logits_fn(request):
  """The mask tests hold for both attention implementations (flash: the Pallas kernel reading
  the mask as key ranges, interpreted on CPU)."""
  overrides = {"model.attention": request.param, "model.flash_block_q": 128,
               "model.flash_block_k": 128}
  model = NMM(tiny_config(**overrides).model, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  logits = jax.jit(lambda params, batch: nnx.merge(graphdef, params).logits(batch)[0])
  # np.asarray waits for the result: JAX may read the numpy inputs after dispatch returns, and the
  # tests mutate them in place.
  return lambda batch: np.asarray(logits(params, batch))


def _changed(a, b):
  return np.abs(np.asarray(a) - np.asarray(b)).max(axis=-1) > 1e-6


def test_later_token_does_not_change_earlier_logits(logits_fn):
  batch = _two_document_batch()
  base = logits_fn(batch)
  batch["tokens"][0, 25] += 1
  changed = _changed(base, logits_fn(batch))
  assert not changed[:25].any()
  assert changed[25:30].all()       # the token itself and the rest of its document
  assert not changed[30:44].any()   # another document never sees it


def test_other_document_does_not_change_logits(logits_fn):
  batch = _two_document_batch()
  base = logits_fn(batch)
  batch["tokens"][0, 31] += 1
  changed = _changed(base, logits_fn(batch))
  assert not changed[:31].any()
  assert changed[31:44].all()


def test_any_patch_changes_every_position_of_its_image(logits_fn):
  batch = _two_document_batch()
  base = logits_fn(batch)
  patch_rows = slice(12, 16)  # pixel rows of the image's last patch row (patches 12..15)
  batch["images"][0, 0, patch_rows, 12:16] = 255 - batch["images"][0, 0, patch_rows, 12:16]
  changed = _changed(base, logits_fn(batch))
  assert not changed[:4].any()            # text before the image
  assert changed[4:4 + P].all()           # all patches of the image, the earlier ones too
  assert changed[4 + P:30].all()          # text after the image in the same document
  assert not changed[30:44].any()         # the other document


def test_unused_image_slot_changes_nothing(logits_fn):
  batch = _two_document_batch()
  base = logits_fn(batch)
  batch["images"][0, 1] = 0
  assert not _changed(base, logits_fn(batch)).any()


@pytest.mark.parametrize("config_file", ["tiny", "default", "bench"])
def test_param_count_matches_model(config_file):
  cfg = load_config(config_file).model
  assert flops.param_counts(cfg)["total"] == model_param_count(cfg)


def test_flops_hand_count():
  cfg = tiny_config().model  # d 64, 2 layers, 4 heads x 16, 2 kv heads, mlp 128, vocab 128
  attn = 64 * 16 * (4 + 4 + 2 + 2)
  mlp = 3 * 64 * 128
  matmul = 2 * (attn + mlp) + 64 * 128 + 4 * 4 * 3 * 64
  assert flops.param_counts(cfg)["matmul"] == matmul
  seq = 128
  assert flops.train_flops_per_sequence(cfg, seq) == 6 * matmul * seq + 6 * 2 * seq**2 * 64


def _loss_and_grads(model_cfg, batch):
  graphdef, params = nnx.split(NMM(model_cfg, rngs=nnx.Rngs(0)))

  def loss(params):
    logits = nnx.merge(graphdef, params).logits(batch)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1))
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("overrides", [{"model.remat": "full"}, {"model.remat": "save_dots"},
                                       {"model.scan_unroll": 2}])
def test_remat_and_unroll_give_the_same_gradients(overrides):
  batch = _two_document_batch()
  want_loss, want_grads = _loss_and_grads(tiny_config().model, batch)
  got_loss, got_grads = _loss_and_grads(tiny_config(**overrides).model, batch)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_stays_close_to_float32():
  batch = _two_document_batch()
  f32_loss, _ = _loss_and_grads(tiny_config().model, batch)
  bf16_loss, bf16_grads = _loss_and_grads(tiny_config(**{"model.dtype": "bfloat16"}).model, batch)
  np.testing.assert_allclose(bf16_loss, f32_loss, rtol=2e-2)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(bf16_grads))
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(bf16_grads))  # f32 master params
