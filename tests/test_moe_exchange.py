"""The expert-parallel exchange with ragged_all_to_all. XLA:CPU cannot run the collective, so:
its semantics (jax.lax.ragged_all_to_all's docstring) are emulated with an all_gather and the
MoE layer's ragged path is checked against the fixed-size all_to_all path, values and
gradients; and the real collective compiles for a v5p-8 with expert parallelism, sending only
the counted rows into buffers of the sizes the counts allow."""
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from nmm_jax import config as config_lib
from nmm_jax import sharding
from nmm_jax.compile import hlo
from nmm_jax.models import moe as moe_lib
from nmm_jax.models.moe import MoEMLP

D, F = 16, 32


def moe_cfg(**kw):
  base = config_lib.base_config().model.moe.to_dict()
  return ml_collections.ConfigDict({**base, "num_experts": 8, "top_k": 2, **kw})


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
  """ragged_all_to_all's documented semantics from all_gathers: source s's rows
  operand_s[input_offsets_s[me] : + send_sizes_s[me]] land at output[output_offsets_s[me]:]."""
  me = jax.lax.axis_index(axis_name)
  operands = jax.lax.all_gather(operand, axis_name)
  starts, sizes, lands = (jax.lax.all_gather(v, axis_name)[:, me]
                          for v in (input_offsets, send_sizes, output_offsets))
  rows = jnp.arange(output.shape[0])
  for s in range(operands.shape[0]):
    idx = rows - lands[s]
    inside = (idx >= 0) & (idx < sizes[s])
    taken = operands[s][jnp.clip(starts[s] + idx, 0, operand.shape[0] - 1)]
    output = jnp.where(inside.reshape((-1,) + (1,) * (output.ndim - 1)), taken, output)
  # The collective's contract: what arrives is what the sources said they send.
  del recv_sizes
  return output


def _layer_outputs(moe, x, is_image, valid, mesh):
  graphdef, params = nnx.split(moe)

  def loss(params, x):
    y, stats = nnx.merge(graphdef, params)(x, is_image, valid)
    return jnp.sum(y * jnp.cos(x)), (y, stats["dropped"])

  step = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
  params = jax.device_put(params, sharding.param_shardings(
      params, sharding.DEFAULT_SHARDING_RULES, mesh))
  x = jax.device_put(x, sharding.batch_sharding(mesh, sharding.DEFAULT_SHARDING_RULES, 3))
  with jax.set_mesh(mesh):
    return step(params, x)


@pytest.mark.parametrize("mesh_shape,receive", [
    (dict(data=2, fsdp=1, tensor=1, expert=4), 0.0),
    (dict(data=1, fsdp=1, tensor=2, expert=4), 0.0),
    (dict(data=2, fsdp=1, tensor=1, expert=4), 1.5)])
def test_ragged_exchange_equals_the_fixed_buffers(mesh_shape, receive, monkeypatch):
  """exchange="ragged" (the collective emulated) gives the all_to_all path's outputs, drops
  and gradients (w.r.t. the input and every parameter): dropless with the worst-case buffer,
  and dropping the same assignments with moe.exchange_capacity=1.5 under a skewed router."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 6, D)), jnp.float32)
  is_image, valid = jnp.asarray(rng.random((8, 6)) < 0.4), jnp.ones((8, 6), bool)
  mesh = sharding.make_mesh(mesh_shape)
  results = {}
  for exchange in ("all_to_all", "ragged"):
    moe = MoEMLP(D, F, moe_cfg(exchange=exchange, exchange_capacity=receive),
                 param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    if receive:  # a constant feature draws most tokens to experts 0-1 (the first device)
      x = x.at[..., 0].set(3.0)
      moe.w_router_DxX[...] = moe.w_router_DxX[...].at[0, :2].add(2.0)
    with monkeypatch.context() as patch:
      patch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)
      results[exchange] = _layer_outputs(moe, x, is_image, valid, mesh)
  (grads, (y, dropped)), (grads_ragged, (y_ragged, dropped_ragged)) = results.values()
  assert float(dropped_ragged) == float(dropped)
  assert (float(dropped) > 0) == (receive > 0), float(dropped)
  np.testing.assert_allclose(y_ragged, y, rtol=1e-5, atol=1e-6)
  for g_ragged, g in zip(jax.tree.leaves(grads_ragged), jax.tree.leaves(grads)):
    np.testing.assert_allclose(g_ragged, g, rtol=1e-4, atol=1e-6)


def test_receive_buffer_drops_the_overflow_only():
  """exchange_capacity=2 on a layer whose router sends everything to expert 0, data=2 x
  expert=4: each device holds 6 tokens, and expert 0's device in each data group takes 2 x 6
  of its group's 24; the rest are dropped. With the worst-case buffer none is."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(8, 6, D)), jnp.float32)
  flags = jnp.zeros((8, 6), bool), jnp.ones((8, 6), bool)
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=1, expert=4))
  dropped = {}
  for receive in (0.0, 2.0):
    moe = MoEMLP(D, F, moe_cfg(top_k=1, exchange="all_to_all", exchange_capacity=receive),
                 param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    moe.w_router_DxX[...] = jnp.zeros((D, 8)).at[:, 0].set(1.0)
    # Positive inputs: every token's largest logit is expert 0's.
    dropped[receive] = float(_layer_outputs(moe, jnp.abs(x), *flags, mesh)[1][1])
  assert dropped[0.0] == 0
  assert dropped[2.0] == 48 - 2 * 12


def test_offsets_place_every_run_back_to_back():
  """ragged_offsets for 4 devices of random counts: receive buffers hold the sources' runs in
  source order without gaps or overlaps, and the return trip lands each run where it left."""
  sizes = np.random.default_rng(1).integers(0, 5, size=(4, 4))
  for me in range(4):
    o = jax.tree.map(np.asarray, moe_lib.ragged_offsets(jnp.asarray(sizes), jnp.asarray(sizes),
                                                         me))
    np.testing.assert_array_equal(o.send_sizes, sizes[me])
    np.testing.assert_array_equal(o.input, np.concatenate([[0], np.cumsum(sizes[me])[:-1]]))
    np.testing.assert_array_equal(o.recv_sizes, sizes[:, me])
    np.testing.assert_array_equal(o.recv_offsets,
                                  np.concatenate([[0], np.cumsum(sizes[:, me])[:-1]]))
    for j in range(4):  # my run to j starts after the runs of the sources before me
      assert o.output[j] == sizes[:me, j].sum()
      assert o.back_output[j] == sizes[j, :me].sum()


def _compiled_layer_on_tpu(exchange, grouped_matmul, b=8, l=128, d=128, f=256):
  """The MoE layer's gradient (bf16, 8 experts top-2) compiled for a v5p-8 (4 chips) with
  mesh.expert=4."""
  from nmm_jax.compile import topologies
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1, expert=4),
                            topologies.target("v5p-8").devices)
  moe = nnx.eval_shape(lambda: MoEMLP(d, f, moe_cfg(exchange=exchange,
                                                    grouped_matmul=grouped_matmul),
                                      param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(moe)
  rules = sharding.DEFAULT_SHARDING_RULES
  params = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), params,
                        sharding.param_shardings(params, rules, mesh))
  batch = sharding.batch_sharding(mesh, rules, 3)
  x = jax.ShapeDtypeStruct((b, l, d), jnp.bfloat16, sharding=batch)
  flags = jax.ShapeDtypeStruct((b, l), bool, sharding=sharding.batch_sharding(mesh, rules, 2))

  def step(params, x, is_image):
    def loss(params):
      y, _ = nnx.merge(graphdef, params)(x, is_image, jnp.ones_like(is_image))
      return jnp.sum(y.astype(jnp.float32))
    return jax.grad(loss)(params)

  with topologies.quiet_stderr(), jax.set_mesh(mesh):
    return jax.jit(step).lower(params, x, flags).compile().as_text()


def test_ragged_exchange_compiles_for_tpu_with_expert_parallelism():
  """v5p-8 (4 chips), expert=4, 8 x 128 tokens top-2, the platform defaults (auto: ragged
  exchange, megablox): the rows go out and come back by ragged-all-to-all, into buffers of
  4 x (a device's 2 x 128 x 2 assignments) rows (the most one device can be sent) and back into
  its own; besides them only the [4, 8] counts move (no expert ids); megablox runs the experts.
  The fixed all_to_all path moves the worst-case buffers (and ids) on every exchange."""
  pytest.importorskip("libtpu")
  text = _compiled_layer_on_tpu("auto", "auto")
  by_kind = {c["kind"]: c for c in hlo.collectives(text)}
  # Forward: rows out and outputs back; backward (parameter gradients): the way back's VJP.
  assert by_kind["ragged-all-to-all"]["count"] == 3
  assert set(by_kind["ragged-all-to-all"]["dtypes"]) == {"bf16"}
  assignments = 8 // 4 * 128 * 2  # a device's 2 rows of 128 tokens, top-2
  rows = {(dtype, int(n)) for dtype, n in
          re.findall(r"= (\w+)\[(\d+),[^ ]* ragged-all-to-all\(", text)}
  assert rows == {("bf16", 4 * assignments), ("bf16", assignments)}, rows
  others = sum(c["bytes"] for kind, c in by_kind.items() if kind != "ragged-all-to-all")
  assert others < 4096, by_kind  # the counts (and the aux statistics' scalars)
  assert 'custom_call_target="tpu_custom_call"' in text

  fixed = {c["kind"]: c for c in hlo.collectives(_compiled_layer_on_tpu("all_to_all",
                                                                        "ragged_dot"))}
  assert "ragged-all-to-all" not in fixed
  assert fixed["all-to-all"]["bytes"] >= 3 * 4 * assignments * 128 * 2


def _moe_step_report(topology, capacity):
  from conftest import tiny_config
  from nmm_jax.compile import report, topologies
  target = topologies.target(topology)
  config = tiny_config(**{"model.moe.num_experts": 8, "model.moe.top_k": 1,
                          "model.moe.exchange_capacity": capacity, "model.dtype": "bfloat16",
                          "model.attention": "xla", "model.d_model": 128, "model.mlp_dim": 512,
                          "data.seq_len": 256, "train.loss_chunk": 128,
                          "mesh.data": len(target.devices) // 4, "mesh.expert": 4})
  r = report.compile_step(config, target, per_chip_batch=4)
  assert r["fits"] and not r["compiler_refused"]
  return r, {c["kind"]: c for c in r["collectives"]}


def test_moe_train_step_compiles_for_tpu_with_ragged_exchange():
  """The whole train step of a bf16 MoE (8 experts top-1, mesh.expert=4, exchange capacity 2)
  as nmm-compile builds it for a v5p-8: it fits and exchanges by ragged-all-to-all."""
  pytest.importorskip("libtpu")
  _, collectives = _moe_step_report("v5p-8", 2.0)
  assert collectives["ragged-all-to-all"]["count"] >= 3


def test_moe_train_step_compiles_for_h100_and_the_receive_buffer_shrinks():
  """The same step for 8 H100s (data=2 x expert=4): ragged-all-to-all, and an exchange
  capacity of 2 (against the worst case, 4) halves the forward receive buffers: the ragged
  results (receive buffers, and the way back's [A, D]) shrink and the temporaries with them."""
  pytest.importorskip("jax_cuda12_plugin")
  (worst, worst_c), (capped, capped_c) = (_moe_step_report("h100-8", c) for c in (0.0, 2.0))
  assert capped_c["ragged-all-to-all"]["bytes"] < 0.7 * worst_c["ragged-all-to-all"]["bytes"]
  assert capped["temp_bytes"] < worst["temp_bytes"]
