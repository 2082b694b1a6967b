"""The decoder: pre-norm blocks (RMSNorm, GQA attention, SwiGLU) stacked with nnx.scan.

The block is the Hugging Face Qwen3 block (Llama's when qk_norm is off), so the text decoder can
be exported to those layouts.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from nmm_jax import sharding
from nmm_jax.models.attention import Attention
from nmm_jax.models.layers import (
    REMAT_POLICIES,
    RESIDUAL,
    RMSNorm,
    SwiGLU,
    rope_tables,
    stacked,
)
from nmm_jax.models.moe import MoEMLP


class DecoderBlock(nnx.Module):
  def __init__(self, cfg, *, moe: bool, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, axis_name="embed", param_dtype=dtype,
                             rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, axis_name="embed", param_dtype=dtype,
                            rngs=rngs)
    self.moe = moe
    if moe:
      self.mlp = MoEMLP(cfg.d_model, cfg.mlp_dim, cfg.moe, param_dtype=dtype, rngs=rngs)
    else:
      self.mlp = SwiGLU(cfg.d_model, cfg.mlp_dim, param_dtype=dtype, rngs=rngs)

  def __call__(self, x_BxLxD, rope, mask_Bx1xLxL, is_image_BxL, valid_BxL):
    """(x, MoE statistics of this layer: {} for a dense MLP). The residual stream is laid out
    by its logical axes at the block's input, between attention and MLP, and at its output (the
    scan carry), so the layers gather weights rather than reduce activations."""
    x_BxLxD = sharding.constrain(x_BxLxD, RESIDUAL)
    x_BxLxD = sharding.constrain(
        x_BxLxD + self.attn(self.attn_norm(x_BxLxD), rope, mask_Bx1xLxL), RESIDUAL)
    if self.moe:
      y_BxLxD, stats = self.mlp(self.mlp_norm(x_BxLxD), is_image_BxL, valid_BxL)
      return sharding.constrain(x_BxLxD + y_BxLxD, RESIDUAL), stats
    return sharding.constrain(x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD)), RESIDUAL), {}

  def cached(self, x_BxLxD, rope, mask_Bx1xLxT, is_image_BxL, valid_BxL, cache, write_at):
    """Decoding (see Attention.cached): (x, updated cache); MoE statistics are dropped."""
    attended_BxLxD, cache = self.attn.cached(self.attn_norm(x_BxLxD), rope, mask_Bx1xLxT, cache,
                                             write_at)
    x_BxLxD = x_BxLxD + attended_BxLxD
    if self.moe:
      return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD), is_image_BxL, valid_BxL)[0], cache
    return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD)), cache


class InterleavedGroup(nnx.Module):
  """`moe.every` layers: every - 1 dense blocks (stacked), then one MoE block. The decoder
  stacks these groups, so the scan body stays one shape when MoE and dense layers alternate."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.dense = stacked(cfg.moe.every - 1, lambda r: DecoderBlock(cfg, moe=False, rngs=r), rngs)
    self.moe_block = DecoderBlock(cfg, moe=True, rngs=rngs)

  def __call__(self, x_BxLxD, rope, mask_Bx1xLxL, is_image_BxL, valid_BxL):
    def apply_dense(x_BxLxD, block):
      return block(x_BxLxD, rope, mask_Bx1xLxL, is_image_BxL, valid_BxL)[0]

    scan = nnx.scan(apply_dense, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry,
                    unroll=True, transform_metadata={nnx.PARTITION_NAME: "layers"})
    x_BxLxD = scan(x_BxLxD, self.dense)
    return self.moe_block(x_BxLxD, rope, mask_Bx1xLxL, is_image_BxL, valid_BxL)

  def cached(self, x_BxLxD, rope, mask_Bx1xLxT, is_image_BxL, valid_BxL, cache, write_at):
    """Decoding: `cache` holds the group's layers on a leading axis, the MoE block's last."""
    def apply_dense(x_BxLxD, block, layer_cache):
      return block.cached(x_BxLxD, rope, mask_Bx1xLxT, is_image_BxL, valid_BxL, layer_cache,
                          write_at)

    scan = nnx.scan(apply_dense, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0),
                    unroll=True, transform_metadata={nnx.PARTITION_NAME: "layers"})
    x_BxLxD, dense_cache = scan(x_BxLxD, self.dense, jax.tree.map(lambda a: a[:-1], cache))
    x_BxLxD, moe_cache = self.moe_block.cached(x_BxLxD, rope, mask_Bx1xLxT, is_image_BxL,
                                               valid_BxL, jax.tree.map(lambda a: a[-1], cache),
                                               write_at)
    return x_BxLxD, jax.tree.map(lambda d, m: jnp.concatenate([d, m[None]]), dense_cache,
                                 moe_cache)


class Decoder(nnx.Module):
  """The layers as up to two scanned stacks: `dense_blocks`, moe.first_dense_layers dense
  layers (MoE models only), then `blocks`, the rest in scan units of one layer, or with MoE
  every N > 1 of N layers (InterleavedGroup)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.remat = cfg.remat
    self.num_layers = cfg.num_layers
    self.head_dim, self.rope_theta = cfg.head_dim, cfg.rope_theta
    self.num_kv_heads = cfg.num_kv_heads
    moe = cfg.moe.num_experts > 0
    self.first_dense = cfg.moe.first_dense_layers if moe else 0
    self.unit = cfg.moe.every if moe else 1
    self.num_units = (cfg.num_layers - self.first_dense) // self.unit
    self.scan_unroll = cfg.scan_unroll

    # One unit's parameters per unit along a leading "layers" axis, so the forward pass is a
    # scan whose compile time does not grow with depth.
    if self.first_dense:
      self.dense_blocks = stacked(self.first_dense,
                                  lambda r: DecoderBlock(cfg, moe=False, rngs=r), rngs)
    if self.unit == 1:
      self.blocks = stacked(self.num_units, lambda r: DecoderBlock(cfg, moe=moe, rngs=r), rngs)
    else:
      self.blocks = stacked(self.num_units, lambda r: InterleavedGroup(cfg, rngs=r), rngs)

  def _stacks(self):
    """(attribute, units, layers per unit, first layer) of each stack, in order."""
    stacks = [("dense_blocks", self.first_dense, 1, 0)] if self.first_dense else []
    return stacks + [("blocks", self.num_units, self.unit, self.first_dense)]

  def __call__(self, x_BxLxD, positions_BxL, mask_Bx1xLxL, before_layer=None, is_image_BxL=None,
               valid_BxL=None):
    """(x, per-MoE-layer statistics stacked on a leading axis; {} when dense).

    `before_layer`: {decoder layer index: fn(x_BxLxD) -> x_BxLxD} applied to the residual
    stream just before that layer (late fusion's internal modes; with MoE every N, the start of
    a unit); the units between two such points run as one scan over their slice of the stacked
    parameters. `is_image_BxL` and `valid_BxL` (real, non-padding tokens) feed the MoE routers
    and their statistics."""
    rope = rope_tables(positions_BxL, self.head_dim, self.rope_theta)
    is_image_BxL, valid_BxL = _token_flags(positions_BxL, is_image_BxL, valid_BxL)

    def apply_block(x_BxLxD, block, _):
      return block(x_BxLxD, rope, mask_Bx1xLxL, is_image_BxL, valid_BxL)

    if self.remat != "none":
      apply_block = nnx.remat(apply_block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
    x_BxLxD, outputs = self._over_stacks(apply_block, x_BxLxD,
                                         {name: {} for name, *_ in self._stacks()}, before_layer)
    return x_BxLxD, outputs["blocks"]  # the dense stack has no MoE statistics

  def init_cache(self, batch: int, length: int, dtype):
    """Empty key/value cache for decoding `batch` sequences of up to `length` tokens: per stack
    {"k", "v"}: [units, (layers per unit,) B, T, K, E]."""
    cache = {}
    for name, units, unit, _ in self._stacks():
      lead = (units,) if unit == 1 else (units, unit)
      shape = lead + (batch, length, self.num_kv_heads, self.head_dim)
      cache[name] = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    return cache

  def cached(self, x_BxLxD, positions_BxL, mask_Bx1xLxT, cache, write_at, before_layer=None,
             is_image_BxL=None, valid_BxL=None):
    """Decoding with a key/value cache (from `init_cache`): this call's L tokens are written
    at cache positions write_at.. and attend over the cache slots `mask_Bx1xLxT` allows.
    Returns (x, updated cache). Other arguments as in __call__."""
    rope = rope_tables(positions_BxL, self.head_dim, self.rope_theta)
    is_image_BxL, valid_BxL = _token_flags(positions_BxL, is_image_BxL, valid_BxL)

    def apply_block(x_BxLxD, block, unit_cache):
      return block.cached(x_BxLxD, rope, mask_Bx1xLxT, is_image_BxL, valid_BxL, unit_cache,
                          write_at)

    return self._over_stacks(apply_block, x_BxLxD, cache, before_layer)

  def _over_stacks(self, apply_block, x_BxLxD, per_stack, before_layer):
    """Each stack in turn (`_over_units`), the injections before its layers with it; returns
    (x, {stack: its outputs})."""
    outputs = {}
    for name, units, unit, first in self._stacks():
      before_unit = {(layer - first) // unit: fn for layer, fn in (before_layer or {}).items()
                     if first <= layer < first + units * unit}
      x_BxLxD, outputs[name] = self._over_units(apply_block, x_BxLxD, getattr(self, name),
                                                units, per_stack[name], before_unit)
    return x_BxLxD, outputs

  def _over_units(self, apply_block, x_BxLxD, blocks, num_units, per_unit, before_unit):
    """Scans `apply_block(x, unit, unit's slice of per_unit) -> (x, output)` over a stack's
    units; returns (x, the outputs stacked on a leading axis)."""
    def run(x_BxLxD, blocks, per_unit, length):
      # unroll >= length removes the loop: on XLA:CPU that saves stacking every layer's
      # residuals for the backward pass (bench config: 5.6 -> 4.7 s/step), at a compile time
      # that grows with depth. The parameters stay stacked either way.
      scan = nnx.scan(apply_block, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0),
                      unroll=min(self.scan_unroll, length),
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
      return scan(x_BxLxD, blocks, per_unit)

    if not before_unit:
      return run(x_BxLxD, blocks, per_unit, num_units)
    graphdef, stacked_params = nnx.split(blocks)
    bounds = sorted(set(before_unit) | {0, num_units})
    outputs = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
      if start in before_unit:
        x_BxLxD = before_unit[start](x_BxLxD)
      segment = nnx.merge(graphdef, jax.tree.map(lambda a: a[start:stop], stacked_params))
      x_BxLxD, segment_outputs = run(x_BxLxD, segment,
                                     jax.tree.map(lambda a: a[start:stop], per_unit),
                                     stop - start)
      outputs.append(segment_outputs)
    return x_BxLxD, jax.tree.map(lambda *parts: jnp.concatenate(parts), *outputs)


def _token_flags(positions_BxL, is_image_BxL, valid_BxL):
  """Defaults: every token text and real."""
  if is_image_BxL is None:
    is_image_BxL = jnp.zeros(positions_BxL.shape, bool)
  if valid_BxL is None:
    valid_BxL = jnp.ones(positions_BxL.shape, bool)
  return is_image_BxL, valid_BxL
