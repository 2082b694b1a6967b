"""Building blocks shared by the models: parameters with logical axes, stacked layers, RMSNorm,
RoPE, SwiGLU.

Shape suffixes: B batch, L sequence length, D model width, H query heads, K kv heads,
G query heads per kv head, E head dim, F mlp hidden, V vocabulary.
"""
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nmm_jax import sharding
from nmm_jax.models.dense import dense

# model.remat: what a layer keeps for the backward pass (the decoder's and the ViT's blocks).
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: fastest when activations fit
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# Logical axes of the residual stream [B, L, D] and of flattened tokens [B*L, ...].
RESIDUAL = ("batch", "activation_length", "activation_embed")


def make_param(rngs: nnx.Rngs, init, shape: Sequence[int], axes: Sequence[str | None],
               dtype=jnp.float32) -> nnx.Param:
  """A parameter that carries its logical axis names (mapped to the mesh by `sharding.py`).

  Sharding is applied by the caller (a jitted init with explicit out_shardings), not eagerly,
  so a model can be built under `jax.eval_shape` without a mesh context.
  """
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(init(rngs.params(), tuple(shape), dtype),
                   out_sharding=tuple(axes), eager_sharding=False)


def fan_in_init(fan_in_axes: int = 1):
  """Normal init with std 1/sqrt(fan_in), fan_in = product of the leading `fan_in_axes` dims."""
  def init(key, shape, dtype):
    fan_in = 1
    for d in shape[:fan_in_axes]:
      fan_in *= d
    return jax.random.normal(key, shape, dtype) * (fan_in ** -0.5)
  return init


def stacked(count: int, build, rngs: nnx.Rngs):
  """`count` modules made by `build(rngs)`, their parameters along a leading "layers" axis
  (applied with nnx.scan, so compile time does not grow with depth)."""
  @nnx.split_rngs(splits=count)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(rngs):
    return build(rngs)
  return make(rngs)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, *, eps: float, axis_name: str, param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = make_param(rngs, nnx.initializers.ones, (dim,), (axis_name,), param_dtype)

  def __call__(self, x):
    # Statistics in f32 even when activations are bf16: the mean of squares overflows/underflows
    # easily in bf16.
    x_f32 = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(x_f32 * x_f32, axis=-1, keepdims=True) + self.eps)
    return (x_f32 * inv_rms).astype(x.dtype) * self.scale[...].astype(x.dtype)


def rope_tables(positions_BxL, head_dim: int, theta: float):
  """(sin, cos) [B, L, 1, E/2], computed once per forward and shared by every layer."""
  inv_freq_E2 = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angle_BxLxE2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq_E2
  return jnp.sin(angle_BxLxE2)[:, :, None, :], jnp.cos(angle_BxLxE2)[:, :, None, :]


def apply_rope(x_BxLxHxE, rope):
  """Rotary embedding in the half-split layout (the Hugging Face Llama/Qwen convention)."""
  sin_BxLx1xE2, cos_BxLx1xE2 = rope
  x1, x2 = jnp.split(x_BxLxHxE.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos_BxLx1xE2 - x2 * sin_BxLx1xE2,
                         x2 * cos_BxLx1xE2 + x1 * sin_BxLx1xE2], axis=-1)
  return out.astype(x_BxLxHxE.dtype)


_MLP_IN, _MLP_OUT = ("embed", "mlp"), ("mlp", "embed")


class SwiGLU(nnx.Module):
  def __init__(self, d_model: int, mlp_dim: int, *, param_dtype, rngs: nnx.Rngs):
    self.w_gate_DxF = make_param(rngs, fan_in_init(), (d_model, mlp_dim), _MLP_IN, param_dtype)
    self.w_up_DxF = make_param(rngs, fan_in_init(), (d_model, mlp_dim), _MLP_IN, param_dtype)
    self.w_down_FxD = make_param(rngs, fan_in_init(), (mlp_dim, d_model), _MLP_OUT, param_dtype)

  def __call__(self, x_BxLxD):
    cast = lambda p: p[...].astype(x_BxLxD.dtype)
    h_BxLxF = (jax.nn.silu(dense(x_BxLxD, cast(self.w_gate_DxF), _MLP_IN))
               * dense(x_BxLxD, cast(self.w_up_DxF), _MLP_IN))
    h_BxLxF = sharding.constrain(h_BxLxF, ("batch", "activation_q_length", "activation_mlp"))
    return dense(h_BxLxF, cast(self.w_down_FxD), _MLP_OUT)
