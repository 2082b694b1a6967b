"""Late fusion's vision encoder: a CLIP-style ViT trained from scratch, and the GELU MLP it shares
with the connector and internal_add's injections (which, like the cross-attention of
internal_xattn, live in models/fusion.py).

Shape suffixes as in layers.py, plus N images (batch x image slots), P patches per image,
C patch pixels (or concatenated features), W the encoder width, J encoder layers.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from nmm_jax import sharding
from nmm_jax.config import vision_head_dim
from nmm_jax.models.dense import dense
from nmm_jax.models.layers import REMAT_POLICIES, RESIDUAL, fan_in_init, make_param, stacked

# Per-head activations: images over the batch axes, heads over the tensor axis.
_HEADS = ("batch", None, "activation_heads", None, None)


class LayerNorm(nnx.Module):
  def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = make_param(rngs, nnx.initializers.ones, (dim,), ("embed",), param_dtype)
    self.bias = make_param(rngs, nnx.initializers.zeros, (dim,), ("embed",), param_dtype)

  def __call__(self, x):
    x_f32 = x.astype(jnp.float32)
    mean = jnp.mean(x_f32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x_f32 - mean), axis=-1, keepdims=True)
    y = (x_f32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class MLP(nnx.Module):
  """in -> GELU(hidden) -> out: the ViT's MLP, the connector, and the fusion MLPs."""

  def __init__(self, d_in: int, d_hidden: int, d_out: int, *, param_dtype, rngs: nnx.Rngs):
    self.w_in_CxF = make_param(rngs, fan_in_init(), (d_in, d_hidden), ("embed", "mlp"),
                               param_dtype)
    self.w_out_FxD = make_param(rngs, fan_in_init(), (d_hidden, d_out), ("mlp", "embed"),
                                param_dtype)

  def __call__(self, x):
    # Its inputs lead with images or sequences (split over the batch axes), then patches.
    x_BxTxC = x.reshape(x.shape[0], -1, x.shape[-1])
    h_BxTxF = jax.nn.gelu(dense(x_BxTxC, self.w_in_CxF[...].astype(x.dtype), ("embed", "mlp")))
    h_BxTxF = sharding.constrain(h_BxTxF, ("batch", None, "activation_mlp"))
    out_BxTxD = dense(h_BxTxF, self.w_out_FxD[...].astype(x.dtype), ("mlp", "embed"))
    return out_BxTxD.reshape(*x.shape[:-1], -1)


class VisionAttention(nnx.Module):
  """Multi-head self-attention over the patches of one image (bidirectional, no RoPE: the
  position embedding carries position). Heads x head size may differ from the width (heads of
  64 at a width that 64 does not divide, as in configs/paper.py).

  q, k and v are one matmul whose columns are ordered head-major ([W, H, 3, E]): a tensor axis
  that splits the heads gives each device whole heads' q, k and v. Ordered [W, 3, H, E], its
  slice of the columns held other heads' q and k, and splitting them moved activations between
  devices (collective-permutes and all-to-alls in every ViT layer at tensor=2)."""

  def __init__(self, width: int, heads: int, head_dim: int, *, param_dtype, rngs: nnx.Rngs):
    self.heads, self.head_dim = heads, head_dim
    self.w_qkv_WxHx3xE = make_param(rngs, fan_in_init(), (width, heads, 3, head_dim),
                                    ("embed", "heads", None, None), param_dtype)
    self.w_o_HxExW = make_param(rngs, fan_in_init(2), (heads, head_dim, width),
                                ("heads", None, "embed"), param_dtype)

  def __call__(self, x_NxPxW):
    n, p, w = x_NxPxW.shape
    h, e = self.heads, self.head_dim
    w_qkv_WxHx3E = self.w_qkv_WxHx3xE[...].astype(x_NxPxW.dtype).reshape(w, h * 3 * e)
    qkv_NxPxHx3xE = sharding.constrain(
        dense(x_NxPxW, w_qkv_WxHx3E, ("embed", "heads")).reshape(n, p, h, 3, e), _HEADS)
    q_NxPxHxE, k_NxPxHxE, v_NxPxHxE = (qkv_NxPxHx3xE[:, :, :, i] for i in range(3))
    logits_NxHxPxP = jnp.einsum("nphe,nqhe->nhpq", q_NxPxHxE * e ** -0.5, k_NxPxHxE,
                                preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits_NxHxPxP, axis=-1).astype(x_NxPxW.dtype)
    out_NxPxHxE = sharding.constrain(jnp.einsum("nhpq,nqhe->nphe", weights, v_NxPxHxE),
                                     _HEADS[:-1])
    w_o_HExW = self.w_o_HxExW[...].astype(x_NxPxW.dtype).reshape(h * e, w)
    return dense(out_NxPxHxE.reshape(n, p, h * e), w_o_HExW, ("heads", "embed"))


class VisionBlock(nnx.Module):
  def __init__(self, v, *, eps: float, param_dtype, rngs: nnx.Rngs):
    self.attn_norm = LayerNorm(v.d_model, eps=eps, param_dtype=param_dtype, rngs=rngs)
    self.attn = VisionAttention(v.d_model, v.num_heads, vision_head_dim(v),
                                param_dtype=param_dtype, rngs=rngs)
    self.mlp_norm = LayerNorm(v.d_model, eps=eps, param_dtype=param_dtype, rngs=rngs)
    self.mlp = MLP(v.d_model, v.mlp_dim, v.d_model, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_NxPxW):
    # The images' stream is laid out like the decoder's: images over the batch axes.
    x_NxPxW = sharding.constrain(x_NxPxW, RESIDUAL)
    x_NxPxW = sharding.constrain(x_NxPxW + self.attn(self.attn_norm(x_NxPxW)), RESIDUAL)
    return sharding.constrain(x_NxPxW + self.mlp(self.mlp_norm(x_NxPxW)), RESIDUAL)


class VisionEncoder(nnx.Module):
  """Patches -> the hidden states after every block, [J, N, P, W] (layer j = after block j)."""

  def __init__(self, v, patch_dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs,
               scan_unroll: int = 1, remat: str = "none"):
    self.patch_embed_CxW = make_param(rngs, fan_in_init(), (patch_dim, v.d_model),
                                      (None, "embed"), param_dtype)
    self.pos_embed_PxW = make_param(rngs, nnx.initializers.normal(0.02),
                                    (v.num_patches, v.d_model), (None, "embed"), param_dtype)
    self.pre_norm = LayerNorm(v.d_model, eps=eps, param_dtype=param_dtype, rngs=rngs)
    # model.scan_unroll and model.remat, as for the decoder: a late model's images are a large
    # share of its activations (4 images of 256 patches beside 2,048 tokens in configs/paper.py).
    self.scan_unroll, self.remat, self.num_layers = scan_unroll, remat, v.num_layers
    self.blocks = stacked(
        v.num_layers, lambda r: VisionBlock(v, eps=eps, param_dtype=param_dtype, rngs=r), rngs)

  def __call__(self, patches_NxPxC):
    x_NxPxW = dense(patches_NxPxC, self.patch_embed_CxW[...].astype(patches_NxPxC.dtype),
                    (None, "embed"))
    x_NxPxW = self.pre_norm(x_NxPxW + self.pos_embed_PxW[...].astype(x_NxPxW.dtype))

    def apply_block(x, block):
      x = block(x)
      return x, x

    if self.remat != "none":
      apply_block = nnx.remat(apply_block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)

    scan = nnx.scan(apply_block, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0),
                    unroll=min(self.scan_unroll, self.num_layers),
                    transform_metadata={nnx.PARTITION_NAME: "layers"})
    _, every_layer_JxNxPxW = scan(x_NxPxW, self.blocks)
    return every_layer_JxNxPxW
