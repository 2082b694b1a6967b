"""nmm-export and the Hugging Face import, on real checkpoints of short tiny runs: safetensors
read back by the library, Hugging Face Qwen3 / Llama folders loaded by transformers with our
log-probabilities, the import round trip, and a run started from an exported decoder."""
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
from nmm_jax.models import NMM
from nmm_jax.train.loop import train_and_evaluate

RUNS = {
    # QK-norm on, untied embeddings -> Qwen3ForCausalLM
    "qwen3": {},
    # QK-norm off, tied embeddings -> LlamaForCausalLM
    "llama": {"model.qk_norm": False, "model.tie_embeddings": True},
}


@pytest.fixture(scope="module")
def runs(shapes_data_dir, tmp_path_factory):
  """{name: workdir} of 3-step runs (past initialisation: norms and heads have moved)."""
  out = {}
  for name, overrides in RUNS.items():
    workdir = str(tmp_path_factory.mktemp(f"run_{name}"))
    train_and_evaluate(tiny_config(**{"data.dir": shapes_data_dir, "train.steps": 3,
                                      "train.warmup_steps": 1, "checkpoint.every_steps": 3,
                                      "eval.every_steps": 100, **overrides}), workdir)
    out[name] = workdir
  return out


def _text_batch(tokenizer, length=24):
  texts = ["a red circle above a blue square", "two green triangles and a small square"]
  rows = [[tokenizer.bos_id] + tokenizer.encode(t) for t in texts]
  rows = [(r * length)[:length] for r in rows]  # repeat to the length: one document per row
  tokens = np.asarray(rows, np.int32)
  positions = np.tile(np.arange(length, dtype=np.int32), (tokens.shape[0], 1))
  return tokens, positions


def _our_log_probs(run, tokens, positions):
  params = run.params()
  model = NMM(run.config.model, rngs=nnx.Rngs(0))
  nnx.update(model, params)
  batch = {"tokens": jnp.asarray(tokens), "positions": jnp.asarray(positions),
           "segment_ids": jnp.ones(tokens.shape, jnp.int32),
           "image_ids": jnp.full(tokens.shape, -1, jnp.int32)}
  return np.asarray(jax.nn.log_softmax(model.logits(batch), axis=-1))


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
                         [("qwen3", "Qwen3ForCausalLM"), ("llama", "LlamaForCausalLM")])
def test_hf_export_loads_in_transformers_with_our_log_probs(runs, tmp_path, name, arch):
  import torch
  import transformers
  out = str(tmp_path / name)
  export(runs[name], out, "hf")
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  assert type(model).__name__ == arch
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


def test_bad_exports_are_refused(runs, tmp_path):
  moe = tiny_config(**{"model.moe.num_experts": 4}).model
  with pytest.raises(hf.ExportError, match="model.moe.num_experts=4"):
    hf.family(moe)
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
