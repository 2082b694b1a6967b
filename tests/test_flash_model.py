"""model.attention="flash" in the model and the train step: the same logits and losses as
model.attention="xla" (the Pallas kernels run in Pallas' interpreter on CPU, in a shard_map over
the mesh), and what nmm-compile shows for a TPU: no [L, L] scores among the temporaries. The
kernels themselves are tested in test_flash_attention.py / test_flash_attention_gpu.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_model import _two_document_batch

from conftest import tiny_config
from nmm_jax.compile import report, topologies
from nmm_jax.config import ConfigError
from nmm_jax.models import NMM, attention_kernels
from nmm_jax.train.loop import train_and_evaluate

FLASH = {"model.attention": "flash", "model.flash_block_q": 128, "model.flash_block_k": 128}


def test_flash_logits_equal_xla_logits():
  batch = _two_document_batch()
  logits = {}
  for name, overrides in (("xla", {"model.attention": "xla"}), ("flash", FLASH)):
    model = NMM(tiny_config(**overrides).model, rngs=nnx.Rngs(0))
    logits[name] = np.asarray(jax.jit(lambda m, b: m.logits(b))(model, batch))[0]
  real = batch["segment_ids"][0] > 0  # padding rows differ by convention (zeros vs uniform)
  np.testing.assert_allclose(logits["flash"][real], logits["xla"][real], rtol=1e-5, atol=1e-5)


def test_flash_prefill_then_xla_decoding_equals_xla():
  """Generation with attention=flash: the prompt's prefill runs the kernel, the decode steps the
  XLA path over the cache; next-token logits equal attention=xla's."""
  batch = {k: np.roll(v, 4, axis=1) if k != "images" else v
           for k, v in _two_document_batch().items()}  # left-padded: padding first
  out = {}
  for name, overrides in (("xla", {"model.attention": "xla"}), ("flash", FLASH)):
    model = NMM(tiny_config(**overrides).model, rngs=nnx.Rngs(0))

    @jax.jit
    def generate(model, prompt):
      first, state = model.prefill(prompt, 64)
      second, _ = model.decode(jnp.argmax(first, axis=-1), state)
      return first, second
    out[name] = [np.asarray(x) for x in generate(model, batch)]
  for flash, xla in zip(out["flash"], out["xla"]):
    np.testing.assert_allclose(flash, xla, rtol=1e-5, atol=1e-5)


def test_auto_means_flash_on_accelerators_and_xla_here():
  model_cfg = tiny_config().model
  assert model_cfg.attention == "auto"
  assert attention_kernels.resolved(model_cfg, "tpu").attention == "flash"
  assert attention_kernels.resolved(model_cfg, "gpu").attention == "flash"
  assert attention_kernels.resolved(model_cfg, "cpu").attention == "xla"
  assert attention_kernels.resolved(model_cfg, "rocm").attention == "xla"  # no kernel there
  odd_head = tiny_config(**{"model.head_dim": 24}).model  # Triton takes powers of two
  assert attention_kernels.resolved(odd_head, "gpu").attention == "xla"
  assert attention_kernels.resolved(odd_head, "tpu").attention == "flash"
  assert model_cfg.attention == "auto"  # a copy was changed


def test_flash_training_equals_xla_training(tmp_path, shapes_data_dir):
  """5 steps on data=2 x fsdp=2 x tensor=2: the kernel runs per device on its sequences and
  heads; the losses are XLA's (f32, relative 1e-4)."""
  overrides = {"train.steps": 5, "data.dir": shapes_data_dir, "eval.every_steps": 100,
               "checkpoint.every_steps": 100, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
  losses = {}
  for name, attention in (("xla", {"model.attention": "xla"}), ("flash", FLASH)):
    records = train_and_evaluate(tiny_config(**overrides, **attention), str(tmp_path / name))
    losses[name] = np.array([r["loss"] for r in records])
  assert len(losses["xla"]) == 5
  np.testing.assert_allclose(losses["flash"], losses["xla"], rtol=1e-4)


@pytest.fixture(scope="module")
def v5p_reports():
  """tiny at seq 1024, 2 sequences per chip on v5p-8 (bf16), compiled with each
  implementation."""
  v5p = topologies.target("v5p-8")
  out = {}
  for name in ("xla", "flash"):
    config = tiny_config(**{"model.attention": name, "data.seq_len": 1024,
                            "model.dtype": "bfloat16", "mesh.data": -1})
    out[name] = report.compile_step(config, v5p, per_chip_batch=2)
  return out


def test_flash_compiles_for_a_tpu_without_the_scores(v5p_reports):
  """The XLA step holds f32 scores [2, 4 heads, 1024, 1024] (32 MiB per layer's forward, more
  for their gradient); the Mosaic kernels keep tiles in VMEM: temporaries fall by more than
  those scores (measured: 219 -> 46 MiB)."""
  scores = 2 * 4 * 1024 * 1024 * 4
  xla, flash = v5p_reports["xla"], v5p_reports["flash"]
  assert flash["fits"] and xla["fits"]
  assert flash["temp_bytes"] < xla["temp_bytes"] - scores


def test_cudnn_is_refused_off_gpus():
  with pytest.raises(ConfigError, match="config.model.attention: 'cudnn' runs on NVIDIA GPUs"):
    report.compile_step(tiny_config(**{"model.attention": "cudnn", "model.dtype": "bfloat16"}),
                        topologies.target("cpu-8"),
                        per_chip_batch=1)


def test_cudnn_and_flash_compile_for_h100():
  """attention=cudnn (jax.nn.dot_product_attention's cuDNN kernel, dense mask) and flash (the
  Triton kernels) compile for 8 H100s; both hold less than XLA's scores."""
  pytest.importorskip("jax_cuda12_plugin")
  h100 = topologies.target("h100-8")
  temp = {}
  for name in ("xla", "cudnn", "flash"):
    config = tiny_config(**{"model.attention": name, "data.seq_len": 1024,
                            "model.dtype": "bfloat16"})
    r = report.compile_step(config, h100, per_chip_batch=2)
    assert r["fits"]
    temp[name] = r["temp_bytes"]
  scores = 2 * 4 * 1024 * 1024 * 4
  assert temp["flash"] < temp["xla"] - scores and temp["cudnn"] < temp["xla"] - scores
