"""Mixture of experts: the dropless grouped-matmul layer against per-token references, the
capacity path's drops, routing modes, aux losses, accounting, and training (sharded too)."""
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import model_param_count, tiny_config
from nmm_jax import config as config_lib
from nmm_jax.models.layers import SwiGLU
from nmm_jax.models.moe import MoEMLP
from nmm_jax.scaling import flops
from nmm_jax.train.loop import train_and_evaluate

D, F = 16, 32


def moe_cfg(**kw):
  base = dict(num_experts=4, top_k=2, routing="learned", capacity_factor=0.0)
  return ml_collections.ConfigDict({**base, **kw})


def inputs(seed=0, b=2, l=12):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(b, l, D)), jnp.float32)
  is_image = jnp.asarray(rng.random((b, l)) < 0.4)
  return x, is_image, jnp.ones((b, l), bool)


def test_one_expert_top1_is_the_dense_mlp():
  moe = MoEMLP(D, F, moe_cfg(num_experts=1, top_k=1), param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  dense = SwiGLU(D, F, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
  dense.w_gate_DxF[...] = moe.w_gate_XxDxF[...][0]
  dense.w_up_DxF[...] = moe.w_up_XxDxF[...][0]
  dense.w_down_FxD[...] = moe.w_down_XxFxD[...][0]
  x, is_image, valid = inputs()
  y, stats = moe(x, is_image, valid)
  np.testing.assert_allclose(y, dense(x), rtol=1e-5, atol=1e-5)
  assert float(stats["dropped"]) == 0


def _per_token_reference(moe, x, is_image):
  """y_n = sum_k w_nk * expert_{id_nk}(x_n), one token at a time."""
  x_NxD = x.reshape(-1, D)
  _, _, ids, weights = moe.route(x_NxD, is_image.reshape(-1))
  out = []
  for n in range(x_NxD.shape[0]):
    y = 0
    for k in range(ids.shape[1]):
      e = int(ids[n, k])
      h = jax.nn.silu(x_NxD[n] @ moe.w_gate_XxDxF[...][e]) * (x_NxD[n] @ moe.w_up_XxDxF[...][e])
      y = y + weights[n, k] * (h @ moe.w_down_XxFxD[...][e])
    out.append(y)
  return jnp.stack(out).reshape(x.shape)


@pytest.mark.parametrize("routing", ["learned", "modality"])
def test_dropless_layer_equals_the_per_token_reference(routing):
  moe = MoEMLP(D, F, moe_cfg(routing=routing), param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  x, is_image, valid = inputs()
  y, stats = moe(x, is_image, valid)
  np.testing.assert_allclose(y, _per_token_reference(moe, x, is_image), rtol=1e-5, atol=1e-5)
  assert float(stats["dropped"]) == 0  # dropless: every assignment computed
  assert float(stats["image_per_expert"].sum() + stats["text_per_expert"].sum()) == 2 * 24
  if routing == "modality":  # image tokens only reach experts 0-1, text tokens only 2-3
    assert float(stats["image_per_expert"][2:].sum()) == 0
    assert float(stats["text_per_expert"][:2].sum()) == 0


def test_capacity_path_drops_what_exceeds_capacity():
  moe = MoEMLP(D, F, moe_cfg(top_k=1, capacity_factor=0.5), param_dtype=jnp.float32,
               rngs=nnx.Rngs(0))
  x, is_image, valid = inputs()
  y, stats = moe(x, is_image, valid)
  _, _, ids, _ = moe.route(x.reshape(-1, D), is_image.reshape(-1))
  capacity = math.ceil(0.5 * 24 / 4)
  per_expert = np.bincount(np.asarray(ids).ravel(), minlength=4)
  assert float(stats["dropped"]) == np.maximum(per_expert - capacity, 0).sum() > 0
  # Dropped tokens get no MLP output (the residual carries them).
  dropped_rows = np.sum(np.all(np.asarray(y).reshape(-1, D) == 0, axis=-1))
  assert dropped_rows == float(stats["dropped"])


def test_aux_losses_of_a_uniform_router():
  moe = MoEMLP(D, F, moe_cfg(num_experts=8, top_k=1), param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  moe.w_router_DxX[...] = jnp.zeros_like(moe.w_router_DxX[...])
  x, is_image, valid = inputs()
  _, stats = moe(x, is_image, valid)
  assert float(stats["load_balance"]) == pytest.approx(1.0)
  assert float(stats["z_loss"]) == pytest.approx(math.log(8) ** 2, rel=1e-6)


def test_param_count_and_active_flops():
  cfg = tiny_config(**{"model.moe.num_experts": 8, "model.moe.top_k": 1}).model
  counts = flops.param_counts(cfg)
  assert counts["total"] == model_param_count(cfg)
  dense = flops.param_counts(tiny_config().model)
  # Active = the dense model's + one router per layer (top-1 of 8 same-size experts).
  assert counts["matmul"] == dense["matmul"] + 2 * 64 * 8


@pytest.mark.parametrize("overrides,key", [
    ({"model.moe.num_experts": 4, "model.moe.top_k": 5}, "model.moe.top_k"),
    ({"model.moe.num_experts": 3, "model.moe.routing": "modality"}, "model.moe.routing"),
    ({"model.moe.num_experts": 4, "model.moe.every": 2}, "model.moe.every"),
    ({"model.moe.num_experts": 4, "model.moe.routing": "random"}, "model.moe.routing"),
])
def test_bad_moe_configs_are_refused(overrides, key):
  with pytest.raises(config_lib.ConfigError, match=f"config.{key}"):
    config_lib.validate(tiny_config(**overrides), jax.device_count())


def test_moe_trains_and_expert_sharding_keeps_the_loss(shapes_data_dir, tmp_path):
  """8 experts top-1, 5 steps: the loss falls, and mesh.expert=4 gives the losses of
  mesh.expert=1 (f32, relative < 1e-4)."""
  losses = {}
  for expert in (1, 4):
    config = tiny_config(**{"model.moe.num_experts": 8, "model.moe.top_k": 1,
                            "mesh.expert": expert, "train.steps": 5, "data.dir": shapes_data_dir,
                            "eval.every_steps": 100, "checkpoint.every_steps": 100})
    records = train_and_evaluate(config, str(tmp_path / f"e{expert}"))
    losses[expert] = [r["loss"] for r in records]
    assert records[-1]["moe/dropped"] == 0
    assert "moe/layer1/image_share/e7" in records[-1]
  assert losses[1][-1] < losses[1][0] - 1.0
  np.testing.assert_allclose(losses[4], losses[1], rtol=1e-4)

  # The specialisation plot from the run's metrics.
  from nmm_jax.train import router_plot
  fraction = router_plot.image_fraction([records[-1]])
  assert fraction.shape == (2, 8) and np.all((0 <= fraction) & (fraction <= 1))
  out = subprocess.run([sys.executable, "-m", "nmm_jax.train.router_plot",
                        f"--workdir={tmp_path / 'e4'}", f"--out={tmp_path / 'router.png'}"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
  assert out.returncode == 0, out.stderr[-2000:]
  assert (tmp_path / "router.png").stat().st_size > 10_000
