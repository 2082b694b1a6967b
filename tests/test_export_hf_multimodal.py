"""`nmm-export --format=hf-multimodal`: the whole model as a Hugging Face remote-code folder,
loaded by transformers (trust_remote_code) in a process that cannot import nmm_jax, for every
family (early; late fusion none / input_concat / internal_add / internal_xattn; MoE): its logits
equal the JAX model's on image+text batches, greedy generate() gives InferenceModel.generate's
tokens, and the processor lays a prompt out as eval/sequences.py's build_sequence does.

The families are exported from freshly initialised parameters (internal_xattn's zero-init gates
opened, as tests/test_export_torch.py does, so the cross-attention counts) through
hf_multimodal.write_folder; one short trained run goes through the command itself. One
subprocess loads every folder and does all the transformers-side work."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from test_export_torch import VARIANTS

from conftest import tiny_config
from nmm_jax.data import pipeline, shards
from nmm_jax.data.tokenizer import load_tokenizer
from nmm_jax.eval import held_out
from nmm_jax.eval import sequences as seq_lib
from nmm_jax.eval.inference import InferenceModel, inference_model_config
from nmm_jax.export import hf_multimodal, run_checkpoint
from nmm_jax.export.run_checkpoint import flat_params
from nmm_jax.models import NMM
from nmm_jax.train.loop import train_and_evaluate

# The fusion variants of the PyTorch reference's test, and an MoE decoder with modality routing
# and a shared expert: no Hugging Face family has them (--format=hf refuses this decoder).
FAMILIES = {**{name: VARIANTS[name] for name in ("early", "late_none", "late_input_concat",
                                                 "late_internal_add", "late_internal_xattn")},
            "moe": {"model.moe.num_experts": 4, "model.moe.top_k": 2,
                    "model.moe.routing": "modality", "model.moe.num_shared_experts": 1}}
# Early fusion edited so that greedy decoding reaches <eos> at the 2nd / 3rd token (_chain_to_eos).
EOS = "early_stops_at_eos"
TRAINED = "trained_early"  # the folder `python -m nmm_jax.export` writes from a 2-step run
PROMPTS = [(["wide.png"], ""), (["held_out.png", "wide.png"], "a red")]  # left-padded batch
MAX_NEW_TOKENS = 6
ROWS = 2  # rows of the packed eval batch compared

# The transformers side: every folder loaded with nmm_jax unimportable; results as .npz files.
LOADER = r"""
import json, sys
sys.modules["nmm_jax"] = None  # `import nmm_jax` raises ImportError from here on
import numpy as np, torch, transformers
from PIL import Image

spec = json.load(open(sys.argv[1]))
packed = dict(np.load(spec["packed"]))
for name, folder in spec["folders"].items():
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      folder, trust_remote_code=True, dtype=torch.float32, output_loading_info=True)
  processor = transformers.AutoProcessor.from_pretrained(folder, trust_remote_code=True)
  images = [[Image.open(p) for p in paths] for paths, _ in spec["prompts"]]
  texts = [text for _, text in spec["prompts"]]
  out = {"loading_problems": np.asarray(sum(len(v) for v in info.values()))}
  single = processor(images=images[1], text=texts[1])
  out.update({"single_" + k: v.numpy() for k, v in single.items()})
  batch = processor(images=images, text=texts)
  out.update({"batch_" + k: v.numpy() for k, v in batch.items()})
  with torch.no_grad():
    out["batch_logits"] = model(**batch).logits.numpy()
    out["packed_logits"] = model(
        input_ids=torch.from_numpy(packed["tokens"]).long(),
        attention_mask=torch.from_numpy(packed["segment_ids"]).long(),
        position_ids=torch.from_numpy(packed["positions"]).long(),
        image_ids=torch.from_numpy(packed["image_ids"]).long(),
        patch_ids=torch.from_numpy(packed["patch_ids"]).long(),
        pixel_values=torch.from_numpy(packed["images"])).logits.numpy()
    for cached in (True, False):  # the key/value cache against recomputing every step
      generated = model.generate(**batch, max_new_tokens=spec["max_new_tokens"],
                                 do_sample=False, use_cache=cached)
      out["generated" if cached else "generated_uncached"] = (
          generated[:, batch["input_ids"].shape[1]:].numpy())
  np.savez(f"{spec['results']}/{name}.npz", **out,
           classes=np.asarray([type(model).__name__, type(processor).__name__]))
"""


def _jax_model(config, seed=3):
  model = NMM(inference_model_config(config.model), rngs=nnx.Rngs(seed))
  if config.model.vision_fusion == "internal_xattn":  # zero-init gates opened: they must matter
    for block in model.fusion_blocks:
      block.gate[...] = jnp.full_like(block.gate[...], 0.7)
  return model


def _chain_to_eos(model, tokenizer):
  """Attention and MLP outputs zeroed, so the last hidden state is the current token's
  embedding, RMS-normalised; head column y is the unit embedding of the token(s) that should
  precede y (tests/test_export.py's construction). The prompts end in <image_end> and "red":
  <image_end> -> c -> <eos> and red -> b -> c -> <eos>."""
  red, b, c = tokenizer.encode("red circle square")
  embed = np.asarray(model.embed_VxD[...])
  unit = lambda v: v / np.linalg.norm(v)
  for stack in (model.decoder.blocks.attn.w_o_HxExD, model.decoder.blocks.mlp.w_down_FxD):
    stack[...] = jnp.zeros_like(stack[...])
  head = np.zeros_like(np.asarray(model.head_DxV[...]))
  head[:, b] = unit(embed[red])
  head[:, c] = unit(unit(embed[b]) + unit(embed[tokenizer.image_end_id]))
  head[:, tokenizer.eos_id] = unit(embed[c])
  model.head_DxV[...] = jnp.asarray(head)


@pytest.fixture(scope="module")
def pictures(shapes_data_dir, tmp_path_factory):
  """{file name: path}: a held-out picture of the shapes data as it is stored, and the same
  stretched to 37x23 (not square, not the model's size: the eval view crops and resizes)."""
  folder = tmp_path_factory.mktemp("pictures")
  image = held_out.caption_examples(shapes_data_dir, "caption", 16, limit=1)[0].image
  paths = {"held_out.png": str(folder / "held_out.png"), "wide.png": str(folder / "wide.png")}
  Image.fromarray(image).save(paths["held_out.png"])
  Image.fromarray(image).resize((37, 23), Image.Resampling.BILINEAR).save(paths["wide.png"])
  return paths


@pytest.fixture(scope="module")
def exported(shapes_data_dir, pictures, tmp_path_factory):
  """{name: (run config, JAX model, its params, folder)} plus the transformers results
  {name: dict of arrays}, and the packed eval batch."""
  root = tmp_path_factory.mktemp("hf_multimodal")
  tokenizer_path = shards.tokenizer_in(shapes_data_dir)
  models, folders = {}, {}
  for name, overrides in FAMILIES.items():
    config = tiny_config(**{"data.dir": shapes_data_dir, **overrides})
    model = _jax_model(config)
    folder = str(root / name)
    os.makedirs(folder)
    hf_multimodal.write_folder(flat_params(nnx.state(model)), config, tokenizer_path, folder, 0)
    models[name], folders[name] = (config, model, nnx.state(model)), folder
  tokenizer = load_tokenizer(tokenizer_path)
  config = tiny_config(**{"data.dir": shapes_data_dir})
  model = _jax_model(config)
  _chain_to_eos(model, tokenizer)
  folders[EOS] = str(root / EOS)
  os.makedirs(folders[EOS])
  hf_multimodal.write_folder(flat_params(nnx.state(model)), config, tokenizer_path, folders[EOS],
                             0)
  models[EOS] = (config, model, nnx.state(model))

  workdir = str(root / "run")
  train_and_evaluate(tiny_config(**{"data.dir": shapes_data_dir, "train.steps": 2,
                                    "train.warmup_steps": 1, "checkpoint.every_steps": 2,
                                    "eval.every_steps": 100}), workdir)
  folders[TRAINED] = str(root / TRAINED)
  done = subprocess.run([sys.executable, "-m", "nmm_jax.export", f"--workdir={workdir}",
                         "--format=hf-multimodal", f"--out={folders[TRAINED]}"],
                        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
  assert done.returncode == 0, done.stderr[-2000:]
  run = run_checkpoint.open_run(workdir)
  trained = _jax_model(run.config)
  nnx.update(trained, run.params())
  models[TRAINED] = (run.config, trained, nnx.state(trained))

  packed = next(iter(pipeline.make_dataset(tiny_config(), shapes_data_dir, "eval", seed=0)))
  packed = {k: np.asarray(v)[:ROWS] for k, v in packed.items() if k != "skipped"}
  np.savez(root / "packed.npz", **packed)
  results = root / "results"
  results.mkdir()
  spec = {"folders": folders, "packed": str(root / "packed.npz"), "results": str(results),
          "max_new_tokens": MAX_NEW_TOKENS,
          "prompts": [([pictures[p] for p in paths], text) for paths, text in PROMPTS]}
  (root / "spec.json").write_text(json.dumps(spec))
  (root / "loader.py").write_text(LOADER)
  env = {**os.environ, "HF_MODULES_CACHE": str(root / "hf_modules"), "HF_HUB_OFFLINE": "1",
         "PYTHONPATH": ""}
  done = subprocess.run([sys.executable, str(root / "loader.py"), str(root / "spec.json")],
                        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                        cwd=str(root), env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  theirs = {name: dict(np.load(results / f"{name}.npz")) for name in folders}
  return {"models": models, "folders": folders, "theirs": theirs, "packed": packed,
          "tokenizer": tokenizer}


ALL = [*FAMILIES, EOS, TRAINED]


def _inference(exported, name):
  config, _, params = exported["models"][name]
  return InferenceModel(config, params, exported["tokenizer"])


def _prompt_sequences(model, pictures):
  return [model.sequence(np.stack([seq_lib.load_image(pictures[p], model.image_size)
                                   for p in paths]), text) for paths, text in PROMPTS]


def test_folder_loads_with_remote_code_only(exported):
  for name in ALL:
    theirs = exported["theirs"][name]
    assert list(theirs["classes"]) == ["NMMForCausalLM", "NMMProcessor"]
    assert int(theirs["loading_problems"]) == 0, name  # no missing / unexpected weights
  folder = exported["folders"][TRAINED]
  assert {"config.json", "model.safetensors", "nmm_torch.py", "modeling_nmm.py",
          "configuration_nmm.py", "processing_nmm.py", "processor_config.json",
          "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(
              os.listdir(folder))
  config = json.load(open(os.path.join(folder, "config.json")))
  assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_nmm.NMMForCausalLM"
  for file in ("processor_config.json", "tokenizer_config.json"):
    saved = json.load(open(os.path.join(folder, file)))
    assert saved["auto_map"]["AutoProcessor"] == "processing_nmm.NMMProcessor", file
  for file in hf_multimodal.REMOTE_FILES + ("nmm_torch.py",):
    source = open(os.path.join(folder, file)).read()
    assert "import nmm_jax" not in source and "from nmm_jax" not in source, file


def test_processor_lays_prompts_out_as_build_sequence(exported, pictures):
  model = _inference(exported, "early")
  sequences = _prompt_sequences(model, pictures)
  for name in ALL:
    theirs = exported["theirs"][name]
    one = sequences[1]
    assert theirs["single_input_ids"][0].tolist() == one.tokens.tolist(), name
    assert theirs["single_image_ids"][0].tolist() == one.image_ids.tolist(), name
    assert theirs["single_patch_ids"][0].tolist() == one.patch_ids.tolist(), name
    np.testing.assert_array_equal(theirs["single_pixel_values"][0], one.images)
    ours = seq_lib.prompt_batch(sequences, model.tokenizer, model.image_size)
    valid = ours["segment_ids"] > 0
    np.testing.assert_array_equal(theirs["batch_attention_mask"], valid.astype(np.int64))
    for key, theirs_key in [("tokens", "input_ids"), ("image_ids", "image_ids"),
                            ("patch_ids", "patch_ids"), ("images", "pixel_values")]:
      np.testing.assert_array_equal(theirs["batch_" + theirs_key], ours[key], f"{name} {key}")


@pytest.mark.parametrize("name", ALL)
def test_logits_equal_the_jax_models(exported, pictures, name):
  _, model, _ = exported["models"][name]
  theirs = exported["theirs"][name]
  inference = _inference(exported, name)
  prompt = seq_lib.prompt_batch(_prompt_sequences(inference, pictures), inference.tokenizer,
                                inference.image_size)
  valid = prompt["segment_ids"] > 0
  ours = np.asarray(model.logits({k: jnp.asarray(v) for k, v in prompt.items()}))
  prompt_diff = np.abs(theirs["batch_logits"] - ours)[valid].max()
  packed = exported["packed"]
  assert (packed["image_ids"] >= 0).any()
  ours = np.asarray(model.logits({k: jnp.asarray(v) for k, v in packed.items()}))
  valid = packed["segment_ids"] > 0
  packed_diff = np.abs(theirs["packed_logits"] - ours)[valid].max()
  print(f"{name}: max |logit difference| prompts {prompt_diff:.2e}, packed {packed_diff:.2e}")
  assert prompt_diff < 1e-4 and packed_diff < 1e-4


@pytest.mark.parametrize("name", ALL)
def test_greedy_generate_gives_inference_models_tokens(exported, pictures, name):
  inference = _inference(exported, name)
  ours = inference.generate(_prompt_sequences(inference, pictures), MAX_NEW_TOKENS)
  eos = inference.tokenizer.eos_id
  theirs = exported["theirs"][name]
  np.testing.assert_array_equal(theirs["generated"], theirs["generated_uncached"])
  for row, generated in zip(theirs["generated"].tolist(), ours):
    ends = [i for i, t in enumerate(row) if t == eos]
    assert row[:ends[0] if ends else len(row)] == generated.ids, name
    assert bool(ends) == generated.finished  # stopped at <eos>, as ours
  if name == EOS:  # <eos> is the 2nd and 3rd token; generate() stops when both rows have it
    assert [len(g.ids) for g in ours] == [1, 2] and all(g.finished for g in ours)
    assert theirs["generated"].shape[1] == 3 < MAX_NEW_TOKENS
