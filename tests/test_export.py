"""nmm-export and the Hugging Face import, on real checkpoints of short tiny runs: safetensors
read back by the library, Hugging Face Qwen3 / Llama / Qwen3-MoE folders loaded by transformers
with our log-probabilities, the import round trip, and a run started from an exported decoder."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from nmm_jax import config as config_lib
from nmm_jax.data.tokenizer import load_tokenizer
from nmm_jax.export import hf, run_checkpoint
from nmm_jax.export.exporter import export
from nmm_jax.models.variables import abstract_model_state
from nmm_jax.train.loop import train_and_evaluate

RUNS = {
    # QK-norm on, untied embeddings -> Qwen3ForCausalLM
    "qwen3": {},
    # QK-norm off, tied embeddings -> LlamaForCausalLM
    "llama": {"model.qk_norm": False, "model.tie_embeddings": True},
}
MOE_RUNS = {
    # -> Qwen3MoeForCausalLM: top-2, renormalised (norm_topk_prob), every layer MoE
    "qwen3_moe": {"model.moe.num_experts": 4, "model.moe.top_k": 2},
    # top-1 (weighted by the raw probability), layers dense, dense, dense, MoE: dense_blocks,
    # blocks.dense and blocks.moe_block; HF's mlp_only_layers and decoder_sparse_step
    "qwen3_moe_top1_every2": {"model.moe.num_experts": 4, "model.moe.top_k": 1,
                              "model.num_layers": 4, "model.moe.every": 2,
                              "model.moe.first_dense_layers": 2},
}


@pytest.fixture(scope="module")
def runs(shapes_data_dir, tmp_path_factory):
  """{name: workdir} of 3-step runs (past initialisation: norms and heads have moved), of
  RUNS and MOE_RUNS, each trained when a test first asks for it (a test of the dense exports
  does not wait for the MoE runs)."""
  class Runs(dict):
    def __missing__(self, name):
      workdir = str(tmp_path_factory.mktemp(f"run_{name}"))
      overrides = {**RUNS, **MOE_RUNS}[name]
      train_and_evaluate(tiny_config(**{"data.dir": shapes_data_dir, "train.steps": 3,
                                        "train.warmup_steps": 1, "checkpoint.every_steps": 3,
                                        "eval.every_steps": 100, **overrides}), workdir)
      self[name] = workdir
      return workdir
  return Runs()


def _text_batch(tokenizer, length=24):
  texts = ["a red circle above a blue square", "two green triangles and a small square"]
  rows = [[tokenizer.bos_id] + tokenizer.encode(t) for t in texts]
  rows = [(r * length)[:length] for r in rows]  # repeat to the length: one document per row
  tokens = np.asarray(rows, np.int32)
  positions = np.tile(np.arange(length, dtype=np.int32), (tokens.shape[0], 1))
  return tokens, positions


def _our_log_probs(run, tokens, positions):
  graphdef, _ = abstract_model_state(run.config.model)
  batch = {"tokens": jnp.asarray(tokens), "positions": jnp.asarray(positions),
           "segment_ids": jnp.ones(tokens.shape, jnp.int32),
           "image_ids": jnp.full(tokens.shape, -1, jnp.int32)}
  # Compiled: op by op, the MoE models took longer than their training.
  log_probs = jax.jit(lambda params: jax.nn.log_softmax(
      nnx.merge(graphdef, params).logits(batch), axis=-1))
  return np.asarray(log_probs(run.params()))


def test_safetensors_export_holds_every_parameter(runs, tmp_path):
  from safetensors import safe_open
  out = str(tmp_path / "st")
  weights = export(runs["qwen3"], out, "safetensors")
  run = run_checkpoint.open_run(runs["qwen3"])
  ours = run_checkpoint.flat_params(run.params())
  with safe_open(weights, framework="numpy") as f:
    assert set(f.keys()) == set(ours)
    for name, array in ours.items():
      np.testing.assert_array_equal(f.get_tensor(name), np.asarray(array))
    assert f.metadata()["step"] == "3"
  meta = json.load(open(os.path.join(out, "nmm_config.json")))
  assert meta["model"] == run.config.model.to_dict() and meta["step"] == 3
  assert os.path.isfile(os.path.join(out, meta["tokenizer"]))


@pytest.mark.parametrize("name,arch",
                         [("qwen3", "Qwen3ForCausalLM"), ("llama", "LlamaForCausalLM"),
                          ("qwen3_moe", "Qwen3MoeForCausalLM"),
                          ("qwen3_moe_top1_every2", "Qwen3MoeForCausalLM")])
def test_hf_export_loads_in_transformers_with_our_log_probs(runs, tmp_path, name, arch):
  import torch
  import transformers
  out = str(tmp_path / name)
  export(runs[name], out, "hf")
  # Every weight in the folder has its place: none missing (left at random init), none unused.
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, output_loading_info=True)
  assert type(model).__name__ == arch
  assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
  run = run_checkpoint.open_run(runs[name])
  tokenizer = load_tokenizer(run.tokenizer_path)
  tokens, positions = _text_batch(tokenizer)
  with torch.no_grad():
    logits = model(input_ids=torch.from_numpy(tokens).long(),
                   position_ids=torch.from_numpy(positions).long()).logits
  theirs = torch.log_softmax(logits.float(), dim=-1).numpy()
  np.testing.assert_allclose(theirs, _our_log_probs(run, tokens, positions), atol=1e-4)
  # The tokenizer folder gives our ids.
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  text = "a red circle above a blue square"
  assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)



def test_hf_export_carries_the_tokenizers_special_ids(runs, tmp_path):
  import transformers
  out = str(tmp_path / "hf")
  export(runs["qwen3"], out, "hf")
  tokenizer = load_tokenizer(run_checkpoint.open_run(runs["qwen3"]).tokenizer_path)
  ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
         "pad_token_id": tokenizer.pad_id}
  assert None not in ids.values()
  for name in ("config.json", "generation_config.json"):
    saved = json.load(open(os.path.join(out, name)))
    assert {k: saved[k] for k in ids} == ids, name
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (
      tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)


def test_hf_generate_stops_at_eos(runs, tmp_path):
  """The exported weights edited so that greedy decoding goes a -> b -> c -> <eos>: generate(),
  given no eos_token_id, stops there (the folder's generation config names <eos>)."""
  import torch
  import transformers
  from safetensors.numpy import load_file, save_file
  out = str(tmp_path / "hf")
  weights = export(runs["qwen3"], out, "hf")
  tokenizer = load_tokenizer(run_checkpoint.open_run(runs["qwen3"]).tokenizer_path)
  a, b, c = tokenizer.encode("red circle square")
  assert len({a, b, c, tokenizer.eos_id}) == 4
  w = load_file(weights)
  # Attention and MLP outputs zeroed: the last hidden state is the current token's embedding,
  # RMS-normalised (norm weight 1), so every embedding comes out with the same length.
  for name in w:
    if name.endswith(("o_proj.weight", "down_proj.weight")):
      w[name] = np.zeros_like(w[name])
  w["model.norm.weight"] = np.ones_like(w["model.norm.weight"])
  # Row y of the head is the unit embedding of the token that should precede y: by
  # Cauchy-Schwarz that row's logit is the largest (the others are 0 or a smaller cosine).
  unit = lambda i: w["model.embed_tokens.weight"][i] / np.linalg.norm(
      w["model.embed_tokens.weight"][i])
  head = np.zeros_like(w["lm_head.weight"])
  head[b], head[c], head[tokenizer.eos_id] = unit(a), unit(b), unit(c)
  w["lm_head.weight"] = head
  save_file(w, weights, metadata={"format": "pt"})

  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  assert model.generation_config.eos_token_id == tokenizer.eos_id
  prompt = torch.tensor([[tokenizer.bos_id, a]])
  max_new_tokens = 10
  with torch.no_grad():
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                               max_new_tokens=max_new_tokens, do_sample=False)
  new = generated[0, prompt.shape[1]:].tolist()
  assert new == [b, c, tokenizer.eos_id] and len(new) < max_new_tokens


def test_hf_export_without_a_tokenizer(runs, tmp_path, monkeypatch):
  """No tokenizer file found: the folder is written and loads as before (no tokenizer, no
  generation_config.json, the family's default ids)."""
  import torch
  import transformers
  monkeypatch.setattr(run_checkpoint, "_tokenizer_path", lambda config, workdir: "")
  out = str(tmp_path / "hf")
  export(runs["qwen3"], out, "hf")
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  saved = json.load(open(os.path.join(out, "config.json")))
  assert [saved[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")] == [None] * 3
  transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)


def test_hf_token_ids_are_null_for_tokens_the_tokenizer_lacks(tmp_path):
  """A tokenizer.json with <bos> and <eos> but no <pad>: pad_token_id stays None, and the saved
  tokenizer gets no <pad> (transformers would add one past the vocabulary)."""
  import tokenizers
  import transformers
  from tokenizers import models
  path = str(tmp_path / "tokenizer.json")
  vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2, "red": 3}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.add_special_tokens(["<bos>", "<eos>"])
  tok.save(path)
  ids = hf.special_token_ids(path)
  assert ids == {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None}
  assert hf.special_token_ids("") == {}
  out = str(tmp_path / "out")
  hf.save_tokenizer(path, out, ids)
  saved = transformers.AutoTokenizer.from_pretrained(out)
  assert saved.pad_token is None and len(saved) == len(vocab)
  assert hf.generation_config(ids).pad_token_id is None

def test_hf_import_round_trip_gives_identical_parameters(runs, tmp_path):
  for name in RUNS:
    out = str(tmp_path / name)
    export(runs[name], out, "hf")
    sizes, decoder = hf.import_folder(out)
    run = run_checkpoint.open_run(runs[name])
    assert all(run.config.model[k] == v for k, v in sizes.items())
    ours = run_checkpoint.flat_params(run.params())
    assert set(decoder) == {n for n in ours if not n.startswith("patch_proj")}
    for key, array in decoder.items():
      np.testing.assert_array_equal(array, np.asarray(ours[key]))


def test_a_run_starts_from_an_exported_decoder(runs, shapes_data_dir, tmp_path):
  """train.init_from_hf: late fusion whose text decoder starts from the Qwen3 export; a
  decoder of another shape is refused before anything is built."""
  folder = str(tmp_path / "lm")
  export(runs["qwen3"], folder, "hf")
  config = tiny_config(**{"model.fusion": "late", "train.init_from_hf": folder,
                          "train.steps": 1, "train.warmup_steps": 0, "train.lr": 1e-12,
                          "data.dir": shapes_data_dir, "eval.every_steps": 100})
  workdir = str(tmp_path / "late")
  train_and_evaluate(config, workdir)
  _, decoder = hf.import_folder(folder)
  started = run_checkpoint.flat_params(run_checkpoint.open_run(workdir).params())
  for key, array in decoder.items():  # one step at lr 1e-12: still the imported weights
    np.testing.assert_allclose(np.asarray(started[key]), array, atol=1e-6)

  wrong = tiny_config(**{"train.init_from_hf": folder, "model.d_model": 96})
  with pytest.raises(config_lib.ConfigError, match=r"train.init_from_hf.*model.d_model=64"):
    config_lib.validate(wrong, jax.device_count())
    hf.check_init_from(wrong)


def test_hf_import_refuses_moe_folders(runs, tmp_path):
  out = str(tmp_path / "moe")
  export(runs["qwen3_moe"], out, "hf")
  with pytest.raises(hf.ExportError, match="qwen3_moe.*MoE checkpoints is not supported"):
    hf.import_folder(out)


def test_bad_exports_are_refused(runs, tmp_path):
  # MoE decoders that Qwen3-MoE's forward pass does not compute: each message names the key.
  moe = {"model.moe.num_experts": 4, "model.moe.top_k": 2}
  for overrides, key in [({"model.moe.routing": "modality"}, "model.moe.routing='modality'"),
                         ({"model.moe.capacity_factor": 1.25}, "model.moe.capacity_factor=1.25"),
                         ({"model.moe.balance": "bias"}, "model.moe.balance='bias'"),
                         ({"model.moe.num_shared_experts": 1}, "model.moe.num_shared_experts=1"),
                         ({"model.qk_norm": False}, "model.qk_norm=False")]:
    model_cfg = tiny_config(**moe, **overrides).model
    with pytest.raises(hf.ExportError) as refused:
      hf.family(model_cfg)
    assert key in str(refused.value) and "--format=safetensors" in str(refused.value)
  assert hf.family(tiny_config(**moe).model) == "Qwen3MoeForCausalLM"
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("x")
  cases = [([f"--workdir={tmp_path}", "--format=hf", f"--out={tmp_path / 'o'}"],
            "no checkpoints/ folder"),
           ([f"--workdir={runs['qwen3']}", "--format=hf", f"--out={tmp_path / 'full'}"],
            "is not empty"),
           ([f"--workdir={runs['qwen3']}", "--step=7", "--format=hf", f"--out={tmp_path / 'o'}"],
            "no checkpoint at step 7")]
  for args, message in cases:
    out = subprocess.run([sys.executable, "-m", "nmm_jax.export", *args], capture_output=True,
                         text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode != 0 and message in out.stderr, out.stderr[-1000:]


def test_scores_equal_the_exported_hf_models(runs, tmp_path):
  """What `nmm-generate --score` prints is what the exported model computes."""
  import torch
  import transformers

  from nmm_jax.eval.run_model import load_run
  out = str(tmp_path / "hf")
  export(runs["qwen3"], out, "hf")
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  model = load_run(runs["qwen3"])
  text = "two red circles on the left ."
  ids, logprobs = model.score([model.sequence([], text, eos=True)])[0]
  tokenizer = model.tokenizer
  input_ids = [tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id]
  assert ids.tolist() == input_ids[1:]
  with torch.no_grad():
    logits = hf_model(input_ids=torch.tensor([input_ids])).logits[0, :-1].float()
  theirs = torch.log_softmax(logits, -1).gather(-1, torch.tensor(input_ids[1:])[:, None])[:, 0]
  np.testing.assert_allclose(theirs.numpy(), logprobs, atol=1e-4)
