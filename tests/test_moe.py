"""Mixture of experts: the dropless grouped-matmul layer against per-token references, the
capacity path's drops, routing modes, aux losses, accounting, and training (sharded too)."""
import collections
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
from nmm_jax import sharding
from nmm_jax.data import pipeline
from nmm_jax.models import NMM
from nmm_jax.models.layers import SwiGLU
from nmm_jax.models.moe import MoEMLP
from nmm_jax.scaling import flops
from nmm_jax.train.loop import train_and_evaluate

D, F = 16, 32


def moe_cfg(**kw):
  """model.moe with its defaults, 4 experts top-2, and `kw`."""
  base = config_lib.base_config().model.moe.to_dict()
  return ml_collections.ConfigDict({**base, "num_experts": 4, "top_k": 2, **kw})


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


def _kept_by_capacity(ids_BxL, capacity):
  """Token t of a sequence is kept iff fewer than `capacity` earlier tokens of that sequence
  chose its expert (top-1)."""
  kept = np.zeros(ids_BxL.shape, bool)
  for row, ids in enumerate(ids_BxL):
    taken = collections.Counter()
    for t, expert in enumerate(ids):
      kept[row, t] = taken[expert] < capacity
      taken[expert] += 1
  return kept


def test_capacity_path_keeps_the_earliest_tokens_of_each_sequence():
  moe = MoEMLP(D, F, moe_cfg(top_k=1, capacity_factor=0.5), param_dtype=jnp.float32,
               rngs=nnx.Rngs(0))
  x, is_image, valid = inputs()
  y, stats = moe(x, is_image, valid)
  _, _, ids, _ = moe.route(x.reshape(-1, D), is_image.reshape(-1))
  kept = _kept_by_capacity(np.asarray(ids).reshape(2, 12), capacity=math.ceil(0.5 * 12 / 4))
  assert float(stats["dropped"]) == (~kept).sum() > 0
  # Kept tokens get their expert's output, dropped ones none (the residual carries them).
  expected = np.where(kept[..., None], _per_token_reference(moe, x, is_image), 0)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def _output_and_grads(moe, x, is_image, valid, mesh=None):
  """The layer's output, dropped count and the gradients of sum(y * x) w.r.t. its params;
  under `mesh` (experts over `expert`, hidden width over `tensor`) when given."""
  graphdef, params = nnx.split(moe)

  def loss(params, x):
    y, stats = nnx.merge(graphdef, params)(x, is_image, valid)
    return jnp.sum(y * x), (y, stats["dropped"])

  step = jax.jit(jax.grad(loss, has_aux=True))
  if mesh is None:
    return step(params, x)
  shardings = sharding.param_shardings(params, sharding.DEFAULT_SHARDING_RULES, mesh)
  params = jax.device_put(params, shardings)
  x = jax.device_put(x, sharding.batch_sharding(mesh, sharding.DEFAULT_SHARDING_RULES, 3))
  with jax.set_mesh(mesh):
    hlo = step.lower(params, x).compile().as_text()
    return step(params, x), hlo


@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])
@pytest.mark.parametrize("mesh_shape", [dict(data=1, fsdp=1, tensor=2, expert=4),
                                        dict(data=2, fsdp=1, tensor=1, expert=4)])
def test_expert_parallel_layer_equals_one_device(capacity_factor, mesh_shape):
  """Tokens exchanged by all-to-all between the devices holding the experts: the same output,
  drops and gradients as the layer on one device."""
  moe = MoEMLP(D, F, moe_cfg(num_experts=8, top_k=2, capacity_factor=capacity_factor),
               param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  x, is_image, valid = inputs(b=8)
  grads, (y, dropped) = _output_and_grads(moe, x, is_image, valid)
  (grads_ep, (y_ep, dropped_ep)), hlo = _output_and_grads(
      moe, x, is_image, valid, sharding.make_mesh(mesh_shape))
  assert "all-to-all" in hlo
  np.testing.assert_allclose(y_ep, y, rtol=1e-5, atol=1e-6)
  assert float(dropped_ep) == float(dropped) and (float(dropped) > 0) == (capacity_factor > 0)
  for g_ep, g in zip(jax.tree.leaves(grads_ep), jax.tree.leaves(grads)):
    np.testing.assert_allclose(g_ep, g, rtol=1e-4, atol=1e-5)


def test_aux_losses_of_a_uniform_router():
  moe = MoEMLP(D, F, moe_cfg(num_experts=8, top_k=1), param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  moe.w_router_DxX[...] = jnp.zeros_like(moe.w_router_DxX[...])
  x, is_image, valid = inputs()
  _, stats = moe(x, is_image, valid)
  assert float(stats["load_balance"]) == pytest.approx(1.0)
  assert float(stats["z_loss_sum"] / stats["real_tokens"]) == pytest.approx(math.log(8) ** 2,
                                                                            rel=1e-6)


def test_param_count_and_active_flops():
  cfg = tiny_config(**{"model.moe.num_experts": 8, "model.moe.top_k": 1}).model
  counts = flops.param_counts(cfg)
  assert counts["total"] == model_param_count(cfg)
  dense = flops.param_counts(tiny_config().model)
  # Active = the dense model's + one router per layer (top-1 of 8 same-size experts).
  assert counts["matmul"] == dense["matmul"] + 2 * 64 * 8
  # MoE every 2 of 4 layers: 2 MoE MLPs (8 SwiGLUs of 3 * 64 * 128 and a router), 2 dense.
  four = {"model.num_layers": 4}
  cfg = tiny_config(**four, **{"model.moe.num_experts": 8, "model.moe.every": 2}).model
  dense = flops.param_counts(tiny_config(**four).model)
  counts = flops.param_counts(cfg)
  assert counts["total"] == model_param_count(cfg)
  assert counts["total"] == dense["total"] + 2 * (7 * 3 * 64 * 128 + 64 * 8)
  assert counts["matmul"] == dense["matmul"] + 2 * 64 * 8


def test_interleaved_moe_with_one_expert_is_the_dense_model(shapes_data_dir):
  """moe.every=2 with 1 expert top-1: layers 1 and 3 are MoE, 0 and 2 dense; given the dense
  model's weights in those places, it computes the dense model's logits."""
  dense = NMM(tiny_config(**{"model.num_layers": 4}).model, rngs=nnx.Rngs(0))
  cfg = tiny_config(**{"model.num_layers": 4, "model.moe.num_experts": 1,
                       "model.moe.every": 2}).model
  interleaved = NMM(cfg, rngs=nnx.Rngs(1))
  # Dense layers 0, 2 -> the groups' dense blocks [2, 1, ...]; layers 1, 3 -> their MoE blocks
  # [2, ...], each SwiGLU matrix as the one expert [2, 1, ...].
  groups = dict(nnx.to_flat_state(nnx.state(interleaved.decoder.blocks)))
  expert_name = {"w_gate_DxF": "w_gate_XxDxF", "w_up_DxF": "w_up_XxDxF",
                 "w_down_FxD": "w_down_XxFxD"}
  for path, layers in nnx.to_flat_state(nnx.state(dense.decoder.blocks)):
    groups[("dense",) + path].set_value(layers[...][0::2][:, None])
    odd = layers[...][1::2]
    if path[-1] in expert_name:
      groups[("moe_block",) + path[:-1] + (expert_name[path[-1]],)].set_value(odd[:, None])
    else:
      groups[("moe_block",) + path].set_value(odd)
  rest = nnx.state(dense)
  del rest["decoder"]
  nnx.update(interleaved, rest)

  b = next(iter(pipeline.make_dataset(tiny_config(), shapes_data_dir, "eval", seed=0)))
  b.pop("skipped")
  np.testing.assert_allclose(interleaved.logits(b), dense.logits(b), rtol=1e-5, atol=1e-5)
  _, stats = interleaved.forward(b)
  assert stats["dropped"].shape == (2,)  # statistics of the 2 MoE layers


@pytest.mark.parametrize("overrides,key", [
    ({"model.moe.num_experts": 4, "model.moe.top_k": 5}, "model.moe.top_k"),
    ({"model.moe.num_experts": 3, "model.moe.routing": "modality"}, "model.moe.routing"),
    ({"model.moe.num_experts": 4, "model.moe.every": 3}, "model.moe.every"),
    ({"model.moe.num_experts": 4, "model.moe.routing": "random"}, "model.moe.routing"),
])
def test_bad_moe_configs_are_refused(overrides, key):
  with pytest.raises(config_lib.ConfigError, match=f"config.{key}"):
    config_lib.validate(tiny_config(**overrides), jax.device_count())


def test_moe_trains_and_expert_sharding_keeps_the_loss(shapes_data_dir, tmp_path):
  """8 experts top-1, 5 steps: the loss falls, and expert parallelism (expert=2 with fsdp=2 and
  tensor=2) gives the losses of mesh.expert=1 (f32, relative < 1e-4). (The layer at expert=4
  equals one device in test_expert_parallel_layer_equals_one_device.)"""
  meshes = {"e1": {}, "e2f2t2": {"mesh.expert": 2, "mesh.fsdp": 2, "mesh.tensor": 2}}
  losses = {}
  for name, mesh in meshes.items():
    config = tiny_config(**{"model.moe.num_experts": 8, "model.moe.top_k": 1, **mesh,
                            "train.steps": 5, "data.dir": shapes_data_dir,
                            "eval.every_steps": 100, "checkpoint.every_steps": 100})
    records = train_and_evaluate(config, str(tmp_path / name))
    losses[name] = [r["loss"] for r in records]
    assert records[-1]["moe/dropped"] == 0
    assert "moe/layer1/image_share/e7" in records[-1]
  assert losses["e1"][-1] < losses["e1"][0] - 1.0
  np.testing.assert_allclose(losses["e2f2t2"], losses["e1"], rtol=1e-4)

  # The specialisation plot from the run's metrics.
  from nmm_jax.train import router_plot
  fraction = router_plot.image_fraction([records[-1]])
  assert fraction.shape == (2, 8) and np.all((0 <= fraction) & (fraction <= 1))
  out = subprocess.run([sys.executable, "-m", "nmm_jax.train.router_plot",
                        f"--workdir={tmp_path / 'e2f2t2'}", f"--out={tmp_path / 'router.png'}"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
  assert out.returncode == 0, out.stderr[-2000:]
  assert (tmp_path / "router.png").stat().st_size > 10_000
