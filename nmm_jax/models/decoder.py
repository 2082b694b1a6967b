"""The decoder: pre-norm blocks (RMSNorm, GQA attention, SwiGLU) stacked with nnx.scan.

The block is the Hugging Face Qwen3 block (Llama's when qk_norm is off), so the text decoder can
be exported to those layouts.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from nmm_jax.models.attention import Attention
from nmm_jax.models.layers import RMSNorm, SwiGLU, rope_tables
from nmm_jax.models.moe import MoEMLP

REMAT_POLICIES = {
    "none": None,  # no rematerialisation: fastest when activations fit
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderBlock(nnx.Module):
  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, axis_name="embed", param_dtype=dtype,
                             rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, axis_name="embed", param_dtype=dtype,
                            rngs=rngs)
    self.moe = cfg.moe.num_experts > 0
    if self.moe:
      self.mlp = MoEMLP(cfg.d_model, cfg.mlp_dim, cfg.moe, param_dtype=dtype, rngs=rngs)
    else:
      self.mlp = SwiGLU(cfg.d_model, cfg.mlp_dim, param_dtype=dtype, rngs=rngs)

  def __call__(self, x_BxLxD, rope, mask_Bx1xLxL, is_image_BxL, valid_BxL):
    """(x, MoE statistics of this layer: {} for a dense MLP)."""
    x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), rope, mask_Bx1xLxL)
    if self.moe:
      y_BxLxD, stats = self.mlp(self.mlp_norm(x_BxLxD), is_image_BxL, valid_BxL)
      return x_BxLxD + y_BxLxD, stats
    return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD)), {}


class Decoder(nnx.Module):
  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.remat = cfg.remat
    self.num_layers = cfg.num_layers
    self.scan_unroll = min(cfg.scan_unroll, cfg.num_layers)
    self.head_dim, self.rope_theta = cfg.head_dim, cfg.rope_theta

    # One block's parameters per layer along a leading "layers" axis, so the forward pass is a
    # scan whose compile time does not grow with depth.
    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return DecoderBlock(cfg, rngs=rngs)

    self.blocks = make_blocks(rngs)

  def __call__(self, x_BxLxD, positions_BxL, mask_Bx1xLxL, before_layer=None, is_image_BxL=None,
               valid_BxL=None):
    """(x, per-layer MoE statistics stacked on a leading layer axis; {} when dense).

    `before_layer`: {decoder layer index: fn(x_BxLxD) -> x_BxLxD} applied to the residual
    stream just before that layer (late fusion's internal modes); the layers between two such
    points run as one scan over their slice of the stacked parameters. `is_image_BxL` and
    `valid_BxL` (real, non-padding tokens) feed the MoE routers and their statistics."""
    rope = rope_tables(positions_BxL, self.head_dim, self.rope_theta)
    if is_image_BxL is None:
      is_image_BxL = jnp.zeros(positions_BxL.shape, bool)
    if valid_BxL is None:
      valid_BxL = jnp.ones(positions_BxL.shape, bool)

    def apply_block(x_BxLxD, block):
      return block(x_BxLxD, rope, mask_Bx1xLxL, is_image_BxL, valid_BxL)

    policy = REMAT_POLICIES[self.remat]
    if self.remat != "none":
      apply_block = nnx.remat(apply_block, policy=policy, prevent_cse=False)

    def run(x_BxLxD, blocks, length):
      # unroll >= length removes the loop: on XLA:CPU that saves stacking every layer's
      # residuals for the backward pass (bench config: 5.6 -> 4.7 s/step), at a compile time
      # that grows with depth. The parameters stay stacked either way.
      scan = nnx.scan(apply_block, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0),
                      unroll=min(self.scan_unroll, length),
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
      return scan(x_BxLxD, blocks)

    if not before_layer:
      return run(x_BxLxD, self.blocks, self.num_layers)
    graphdef, stacked = nnx.split(self.blocks)
    bounds = sorted(set(before_layer) | {0, self.num_layers})
    stats = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
      if start in before_layer:
        x_BxLxD = before_layer[start](x_BxLxD)
      segment = nnx.merge(graphdef, jax.tree.map(lambda a: a[start:stop], stacked))
      x_BxLxD, segment_stats = run(x_BxLxD, segment, stop - start)
      stats.append(segment_stats)
    return x_BxLxD, jax.tree.map(lambda *parts: jnp.concatenate(parts), *stats)
