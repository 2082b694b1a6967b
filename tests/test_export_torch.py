"""The pure-PyTorch reference (export/nmm_torch.py) against the JAX models on an image+text
batch of the embedded data: early fusion, late fusion in every vision_fusion mode, and MoE
decoders (learned and modality routing, capacity, interleaved); and `--format=torch` folders
that load without nmm_jax."""
import importlib.util
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import tiny_config
from nmm_jax.data import pipeline
from nmm_jax.export import nmm_torch
from nmm_jax.export.run_checkpoint import flat_params
from nmm_jax.models import NMM
from nmm_jax.train.loop import train_and_evaluate

LATE = {"model.fusion": "late"}
VARIANTS = {
    "early": {},
    "late_none": LATE,
    # The ViT's heads x head size wider than its width (configs/paper.py's ViTs differ too).
    "late_input_concat": {**LATE, "model.vision_fusion": "input_concat",
                          "model.vision_layers": (1, -1), "model.vision.head_dim": 24},
    "late_internal_add": {**LATE, "model.vision_fusion": "internal_add",
                          "model.vision_layers": (1, -1), "model.fusion_decoder_layers": (1,)},
    "late_internal_xattn": {**LATE, "model.vision_fusion": "internal_xattn",
                            "model.vision_layers": (0, 2, -1),
                            "model.fusion_decoder_layers": (0, 1)},
    "moe_learned_top2": {"model.moe.num_experts": 4, "model.moe.top_k": 2},
    "moe_modality_capacity": {"model.moe.num_experts": 4, "model.moe.routing": "modality",
                              "model.moe.capacity_factor": 0.5},
    "moe_every_2_tied": {"model.num_layers": 4, "model.moe.num_experts": 4,
                         "model.moe.every": 2, "model.tie_embeddings": True,
                         "model.qk_norm": False},
    # Bias balancing (the biases set below), a shared expert, a dense first layer, top-2
    # without renormalisation (DeepSeek's weighting).
    "moe_bias_shared_first_dense": {"model.num_layers": 3, "model.moe.num_experts": 4,
                                    "model.moe.top_k": 2, "model.moe.normalize_topk": False,
                                    "model.moe.balance": "bias",
                                    "model.moe.num_shared_experts": 1,
                                    "model.moe.first_dense_layers": 1},
    "moe_modality_bias_top1": {"model.moe.num_experts": 4, "model.moe.top_k": 1,
                               "model.moe.routing": "modality", "model.moe.balance": "bias"},
}


@pytest.fixture(scope="module")
def batch(shapes_data_dir):
  b = next(iter(pipeline.make_dataset(tiny_config(), shapes_data_dir, "eval", seed=0)))
  b.pop("skipped")
  return b


def _torch_batch(batch):
  return {k: torch.from_numpy(np.array(batch[k])) for k in
          ("tokens", "positions", "segment_ids", "image_ids", "patch_ids", "images")}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_torch_reference_gives_the_jax_logits(variant, batch):
  config = tiny_config(**VARIANTS[variant])
  model = NMM(config.model, rngs=nnx.Rngs(3))
  if variant == "late_internal_xattn":  # open the zero-initialised gates: they must matter
    for block in model.fusion_blocks:
      block.gate[...] = jnp.full_like(block.gate[...], 0.7)
  if config.model.moe.balance == "bias":  # biases large enough to change some choices
    bias = model.decoder.blocks.mlp.router_bias_X
    bias[...] = jnp.asarray(np.random.default_rng(0).normal(0, 0.2, bias[...].shape),
                            jnp.float32)
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in flat_params(nnx.state(model)).items()}
  reference = nmm_torch.NMMTorch(config.model.to_dict(), tensors)
  ours = np.asarray(model.logits({k: jnp.asarray(v) for k, v in batch.items()}))
  theirs = reference(**_torch_batch(batch)).numpy()
  assert np.asarray(batch["image_ids"] >= 0).any()
  np.testing.assert_allclose(theirs, ours, atol=2e-4, rtol=1e-4)


def test_torch_export_folder_loads_without_nmm_jax(batch, shapes_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(**{**VARIANTS["late_internal_add"], "data.dir": shapes_data_dir,
                          "train.steps": 2, "train.warmup_steps": 1,
                          "checkpoint.every_steps": 2, "eval.every_steps": 100})
  train_and_evaluate(config, workdir)
  out = tmp_path / "torch"
  done = subprocess.run([sys.executable, "-m", "nmm_jax.export", f"--workdir={workdir}",
                         "--format=torch", f"--out={out}"], capture_output=True, text=True,
                        timeout=300, stdin=subprocess.DEVNULL)
  assert done.returncode == 0, done.stderr[-2000:]
  assert {"model.safetensors", "nmm_config.json", "nmm_torch.py", "tokenizer.json"} <= set(
      os.listdir(out))
  spec = importlib.util.spec_from_file_location("exported_nmm_torch", out / "nmm_torch.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  logits = module.load(str(out))(**_torch_batch(batch)).numpy()
  assert logits.shape == (*batch["tokens"].shape, config.model.vocab_size)
  assert np.isfinite(logits).all()
