"""grouped_matmul: the megablox kernel (TPU interpret mode on the CPU) == ragged_dot in values and
in the gradients of lhs and rhs, over uneven and empty groups, rows past the groups, bf16 and
dims that need padding; and the forward + backward compile for a v5p chip through libtpu's
compile-only devices as Mosaic kernels."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from nmm_jax.models.grouped_matmul import (
  GROUPED_MATMULS,
  default_grouped_matmul,
  grouped_matmul,
  megablox_tiling,
)

# The TPU interpreter: out-of-bounds block reads raise and uninitialised memory is NaN, so rows
# the kernel leaves unwritten show up here rather than on a TPU.
INTERPRET = pltpu.InterpretParams()


def operands(r, d, f, group_sizes, dtype, seed=0):
  rng = np.random.default_rng(seed)
  lhs_RxD = jnp.asarray(rng.normal(size=(r, d)), dtype)
  rhs_XxDxF = jnp.asarray(rng.normal(size=(len(group_sizes), d, f)) / np.sqrt(d), dtype)
  cotangent_RxF = jnp.asarray(rng.normal(size=(r, f)), jnp.float32)
  return lhs_RxD, rhs_XxDxF, jnp.asarray(group_sizes, jnp.int32), cotangent_RxF


def value_and_grads(lhs_RxD, rhs_XxDxF, group_sizes_X, cotangent_RxF, **kwargs):
  """(out, d lhs, d rhs) of sum(out * cotangent), jitted."""
  def loss(lhs_RxD, rhs_XxDxF):
    out_RxF = grouped_matmul(lhs_RxD, rhs_XxDxF, group_sizes_X, **kwargs)
    return jnp.sum(out_RxF.astype(jnp.float32) * cotangent_RxF), out_RxF

  @jax.jit
  def run(lhs_RxD, rhs_XxDxF):
    (_, out_RxF), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(lhs_RxD,
                                                                                 rhs_XxDxF)
    return (out_RxF, *grads)
  return run(lhs_RxD, rhs_XxDxF)


# (R, D, F, group sizes): boundaries inside m tiles; an empty group first, in the middle and
# last; rows past the groups; dims off 128 (padded); every row in a group followed by empty ones;
# no rows in any group.
CASES = {
    "uneven": (256, 128, 256, [64, 100, 92]),
    "empty_groups_tail_rows_padded_dims": (200, 100, 72, [0, 50, 0, 90, 0]),
    "full_then_empty": (128, 256, 128, [128, 0, 0]),
    "all_empty": (128, 128, 128, [0, 0]),
}


@pytest.mark.parametrize("case", CASES)
def test_megablox_matches_ragged_dot_f32(case):
  r, d, f, group_sizes = CASES[case]
  args = operands(r, d, f, group_sizes, jnp.float32)
  want = value_and_grads(*args, implementation="ragged_dot")
  got = value_and_grads(*args, implementation="megablox", interpret=INTERPRET)
  for name, w, g in zip(("out", "d_lhs", "d_rhs"), want, got):
    assert g.shape == w.shape and g.dtype == w.dtype == jnp.float32, name
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=name)
  total = sum(group_sizes)
  # Past the groups: exact zeros in both implementations, output and lhs gradient alike.
  for out in (want[0], got[0], want[1], got[1]):
    assert not np.any(np.asarray(out[total:]))
  if case == "all_empty":
    assert not np.any(np.asarray(got[2]))


def test_megablox_matches_ragged_dot_bf16():
  """bf16 operands, bf16 output; both against the f32 product of the same (bf16) values."""
  r, d, f, group_sizes = 256, 256, 128, [30, 0, 150, 60]  # 240 of 256 rows in groups
  lhs_RxD, rhs_XxDxF, group_sizes_X, cotangent_RxF = operands(r, d, f, group_sizes,
                                                               jnp.bfloat16)
  exact = value_and_grads(lhs_RxD.astype(jnp.float32), rhs_XxDxF.astype(jnp.float32),
                          group_sizes_X, cotangent_RxF, implementation="ragged_dot")
  for kwargs in (dict(implementation="ragged_dot"),
                 dict(implementation="megablox", interpret=INTERPRET)):
    got = value_and_grads(lhs_RxD, rhs_XxDxF, group_sizes_X, cotangent_RxF, **kwargs)
    for name, w, g in zip(("out", "d_lhs", "d_rhs"), exact, got):
      assert g.dtype == jnp.bfloat16, (kwargs, name)
      scale = float(jnp.max(jnp.abs(w)))
      np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=2e-2, atol=2e-2 * scale,
                                 err_msg=f"{kwargs} {name}")
    assert not np.any(np.asarray(got[0][240:], np.float32))


def test_megablox_ignores_garbage_past_the_groups():
  """NaN in the lhs rows past the groups (an unused receive-buffer tail) reaches neither the
  output nor either gradient."""
  lhs_RxD, rhs_XxDxF, group_sizes_X, cotangent_RxF = operands(256, 128, 128, [70, 90],
                                                               jnp.float32)
  lhs_RxD = lhs_RxD.at[160:].set(jnp.nan)
  want = value_and_grads(lhs_RxD.at[160:].set(0), rhs_XxDxF, group_sizes_X, cotangent_RxF,
                         implementation="ragged_dot")
  got = value_and_grads(lhs_RxD, rhs_XxDxF, group_sizes_X, cotangent_RxF,
                        implementation="megablox", interpret=INTERPRET)
  for name, w, g in zip(("out", "d_lhs", "d_rhs"), want, got):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=name)


def test_tiling_and_choice():
  assert megablox_tiling(4096, 2048, 768) == ((4096, 2048, 768), (512, 512, 384))
  assert megablox_tiling(200, 100, 1408) == ((256, 128, 1408), (256, 128, 128))
  assert megablox_tiling(640, 72, 8) == ((640, 128, 128), (128, 128, 128))
  assert GROUPED_MATMULS == ("ragged_dot", "megablox")
  assert default_grouped_matmul("tpu") == "megablox"
  assert default_grouped_matmul("cuda") == default_grouped_matmul("cpu") == "ragged_dot"
  lhs_RxD, rhs_XxDxF, group_sizes_X, _ = operands(8, 4, 4, [8], jnp.float32)
  with pytest.raises(ValueError, match="expected one of"):
    grouped_matmul(lhs_RxD, rhs_XxDxF, group_sizes_X, implementation="einsum")


def test_megablox_compiles_for_tpu():
  """v5p, bf16 at full 512 tiles: Mosaic accepts gmm (forward, d lhs) and tgmm (d rhs), and the
  tiles fit the chip's VMEM."""
  pytest.importorskip("libtpu")
  from nmm_jax.compile import topologies
  device = topologies.target("v5p-8").devices[0]
  place = jax.sharding.SingleDeviceSharding(device)
  r, d, f, x = 2048, 1024, 1024, 8
  args = (jax.ShapeDtypeStruct((r, d), jnp.bfloat16, sharding=place),
          jax.ShapeDtypeStruct((x, d, f), jnp.bfloat16, sharding=place),
          jax.ShapeDtypeStruct((x,), jnp.int32, sharding=place))
  forward = lambda lhs, rhs, sizes: grouped_matmul(lhs, rhs, sizes, implementation="megablox")
  loss = lambda lhs, rhs, sizes: jnp.sum(forward(lhs, rhs, sizes).astype(jnp.float32))
  step = lambda lhs, rhs, sizes: jax.value_and_grad(loss, argnums=(0, 1))(lhs, rhs, sizes)
  with topologies.quiet_stderr():
    compiled_forward = jax.jit(forward).lower(*args).compile()
    compiled_step = jax.jit(step).lower(*args).compile()
  kernel = 'custom_call_target="tpu_custom_call"'
  assert compiled_forward.as_text().count(kernel) == 1
  assert compiled_step.as_text().count(kernel) == 3  # gmm, gmm of the cotangent, tgmm
