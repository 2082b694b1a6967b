"""models/dense.py: the projection whose weight gradient is reduce-scattered explicitly under
FSDP gives the plain product's values and gradients on every mesh, and the compiled program
really reduce-scatters it (cpu-8, with the explicit form turned on for the CPU: by default it is
for TPUs only)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from nmm_jax import sharding
from nmm_jax.compile import hlo, report, topologies
from nmm_jax.config import with_values
from nmm_jax.models import dense as dense_lib
from nmm_jax.train import loss as loss_lib

B, L, I, O = 8, 16, 64, 96
MESHES = {
    "fsdp8": {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1},
    "data2_fsdp4": {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1},
}
# Column-parallel (the input projections) and row-parallel (the output projections) weights.
WEIGHT_AXES = {"embed_mlp": ("embed", "mlp"), "mlp_embed": ("mlp", "embed")}


@pytest.fixture(autouse=True)
def explicit_on_cpu(monkeypatch):
  monkeypatch.setattr(dense_lib, "EXPLICIT_PLATFORMS", ("tpu", "cpu"))


def _inputs():
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (B, L, I), jnp.float32)
  w = jax.random.normal(keys[1], (I, O), jnp.float32) / 8
  dy = jax.random.normal(keys[2], (B, L, O), jnp.float32)
  return x, w, dy


def _vjp(x, w, dy, w_axes):
  y, vjp = jax.vjp(lambda x, w: dense_lib.dense(x, w, w_axes), x, w)
  return (y, *vjp(dy))


def _sharded_vjp(mesh_shape, w_axes, rules=sharding.DEFAULT_SHARDING_RULES):
  mesh = sharding.make_mesh(mesh_shape)
  x, w, dy = _inputs()
  spec = lambda axes, a: sharding.logical_to_spec(axes, rules, mesh, shape=a.shape)
  place = lambda a, axes: jax.device_put(a, jax.sharding.NamedSharding(mesh, spec(axes, a)))
  activation_in = ("batch", None, "activation_mlp" if w_axes[0] == "mlp" else None)
  activation_out = ("batch", None, "activation_mlp" if w_axes[1] == "mlp" else None)
  args = (place(x, activation_in), place(w, w_axes), place(dy, activation_out))
  step = sharding.traced_under(mesh, jax.jit(lambda x, w, dy: _vjp(x, w, dy, w_axes)), rules)
  return step, args


@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("weight", WEIGHT_AXES)
def test_values_and_gradients_equal_the_plain_product(mesh_name, weight):
  w_axes = WEIGHT_AXES[weight]
  x, w, dy = _inputs()
  expected = _vjp(x, w, dy, None)  # no mesh: the plain product
  step, args = _sharded_vjp(MESHES[mesh_name], w_axes)
  got = step(*args)
  for name, e, g in zip(("y", "dx", "dw"), expected, got):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5, err_msg=name)
  # The weight gradient comes out in the weight's own layout (FSDP shards).
  mesh = sharding.make_mesh(MESHES[mesh_name])
  w_spec = sharding.logical_to_spec(w_axes, sharding.DEFAULT_SHARDING_RULES, mesh, shape=w.shape)
  assert got[2].sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, w_spec), 2)


def test_sequence_parallel_rules_keep_the_gradients():
  rules = sharding.SEQUENCE_PARALLEL_RULES + sharding.DEFAULT_SHARDING_RULES
  x, w, dy = _inputs()
  expected = _vjp(x, w, dy, None)
  step, args = _sharded_vjp(MESHES["data2_fsdp2_tensor2"], WEIGHT_AXES["mlp_embed"], rules)
  for e, g in zip(expected, step(*args)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5)


def test_the_weight_gradient_is_reduce_scattered():
  """fsdp=8: one reduce-scatter of the [I, O] gradient (result I/8 x O per device) and no
  all-reduce, where the plain product leaves the resharding to the compiler."""
  step, args = _sharded_vjp(MESHES["fsdp8"], WEIGHT_AXES["mlp_embed"])
  kinds = {c["kind"]: c for c in hlo.collectives(step.lower(*args).compile().as_text())}
  assert "all-reduce" not in kinds
  assert kinds["reduce-scatter"]["bytes"] == I * O * 4 // 8


def _plan_under(mesh_shape):
  mesh = sharding.make_mesh(mesh_shape)
  return sharding.traced_under(mesh, lambda: dense_lib.reduction(B, (I, O), ("embed", "mlp")))()


def test_where_the_compiler_reduces():
  """No plan without a batch axis that splits the weight (pure data parallelism all-reduces
  whole gradients), outside a mesh, or on a platform whose compiler reduce-scatters itself."""
  assert _plan_under({"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}) is None
  assert dense_lib.reduction(B, (I, O), ("embed", "mlp")) is None  # no mesh at all
  assert _plan_under(MESHES["fsdp8"]) is not None


def test_only_tpus_get_it_by_default(monkeypatch):
  monkeypatch.setattr(dense_lib, "EXPLICIT_PLATFORMS", ("tpu",))
  assert _plan_under(MESHES["fsdp8"]) is None


def test_the_vision_side_reduce_scatters_too():
  """Late fusion with cross-attention (the ViT, the connector and the gated cross-attention all
  project through `dense`, and the LM head's gradient is reduced as theirs), fsdp=8: what stays
  all-reduced is the vectors (norms, biases, position embeddings, gates), under a tenth of the
  parameter bytes (4.6% here).
  With the ViT and fusion layers multiplying by plain `@`, their weight gradients were
  all-reduced too: about a third of the parameter bytes."""
  config = with_values(load_config("late_default"), **{
      "mesh.data": 1, "mesh.fsdp": 8, "model.vision_fusion": "internal_xattn",
      "model.vision_layers": (0, 1, -1), "model.fusion_decoder_layers": (1, 2)})
  r = report.compile_step(config, topologies.target("cpu-8"), 2)
  all_reduced = sum(c["bytes"] for c in r["collectives"] if c["kind"] == "all-reduce")
  assert all_reduced < 0.1 * r["params"] * 4, (all_reduced, r["params"])


def _head_inputs():
  keys = jax.random.split(jax.random.key(1), 3)
  hidden = jax.random.normal(keys[0], (B, L, I), jnp.float32)
  head = jax.random.normal(keys[1], (I, O), jnp.float32) / 8
  targets = jax.random.randint(keys[2], (B, L), 0, O)
  weights = jnp.ones((B, L), jnp.float32) / (B * L)
  return hidden, head, targets, weights


def _head_grads(hidden, head, targets, weights):
  return jax.value_and_grad(lambda h, w: loss_lib.weighted_nll(h, w, targets, weights, 8)[0],
                            argnums=(0, 1))(hidden, head)


@pytest.mark.parametrize("mesh_name", ["fsdp8", "data2_fsdp2_tensor2"])
def test_the_head_gradient_is_reduce_scattered_too(mesh_name):
  """The fused loss's head gradient (a sum of the batch parts' partial sums) goes through the
  same explicit reduction: equal values and gradients, and at fsdp=8 one reduce-scatter of the
  [D, V] gradient (f32 here: the head's dtype) and no all-reduce of it."""
  inputs = _head_inputs()
  expected = _head_grads(*inputs)
  mesh = sharding.make_mesh(MESHES[mesh_name])
  rules = sharding.DEFAULT_SHARDING_RULES
  spec = lambda axes, a: sharding.logical_to_spec(axes, rules, mesh, shape=a.shape)
  axes = (("batch", None, None), loss_lib.HEAD_AXES, ("batch", None), ("batch", None))
  args = [jax.device_put(a, jax.sharding.NamedSharding(mesh, spec(x, a)))
          for a, x in zip(inputs, axes)]
  step = sharding.traced_under(mesh, jax.jit(_head_grads), rules)
  loss, (d_hidden, d_head) = step(*args)
  np.testing.assert_allclose(float(loss), float(expected[0]), rtol=1e-6)
  for e, g in zip(expected[1], (d_hidden, d_head)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-6)
  assert d_head.sharding.is_equivalent_to(
      jax.sharding.NamedSharding(mesh, spec(loss_lib.HEAD_AXES, inputs[1])), 2)
  if mesh_name == "fsdp8":
    kinds = {c["kind"]: c for c in hlo.collectives(step.lower(*args).compile().as_text())}
    assert kinds["reduce-scatter"]["bytes"] == I * O * 4 // 8
    assert kinds.get("all-reduce", {"bytes": 0})["bytes"] < 64  # the loss, a scalar or two
