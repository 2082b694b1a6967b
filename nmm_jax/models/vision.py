"""Late fusion's vision side: a CLIP-style ViT trained from scratch, the connector, and the modules
that inject chosen encoder layers into the decoder (Lin et al. 2025's multi-layer fusion).

Shape suffixes as in layers.py, plus N images (batch x image slots), P patches per image,
C patch pixels (or concatenated features), W the encoder width, J encoder layers.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from nmm_jax.models.layers import REMAT_POLICIES, fan_in_init, make_param, stacked

_MASKED = -1e30


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
    lead, c = x.shape[:-1], x.shape[-1]
    h = jax.nn.gelu(x.reshape(-1, c) @ self.w_in_CxF[...].astype(x.dtype))
    return (h @ self.w_out_FxD[...].astype(x.dtype)).reshape(*lead, -1)


class VisionAttention(nnx.Module):
  """Multi-head self-attention over the patches of one image (bidirectional, no RoPE: the
  position embedding carries position)."""

  def __init__(self, width: int, heads: int, *, param_dtype, rngs: nnx.Rngs):
    e = width // heads
    self.heads = heads
    self.w_qkv_Wx3HE = make_param(rngs, fan_in_init(), (width, 3 * width), ("embed", "mlp"),
                                  param_dtype)
    self.w_o_HExW = make_param(rngs, fan_in_init(), (width, width), ("mlp", "embed"), param_dtype)

  def __call__(self, x_NxPxW, key_mask_NxP=None):
    n, p, w = x_NxPxW.shape
    h, e = self.heads, w // self.heads
    qkv = (x_NxPxW.reshape(n * p, w) @ self.w_qkv_Wx3HE[...].astype(x_NxPxW.dtype))
    q_NxPxHxE, k_NxPxHxE, v_NxPxHxE = jnp.split(qkv.reshape(n, p, 3 * h, e), 3, axis=2)
    logits_NxHxPxP = jnp.einsum("nphe,nqhe->nhpq", q_NxPxHxE * e ** -0.5, k_NxPxHxE,
                                preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits_NxHxPxP, axis=-1).astype(x_NxPxW.dtype)
    out_NxPxHxE = jnp.einsum("nhpq,nqhe->nphe", weights, v_NxPxHxE)
    return (out_NxPxHxE.reshape(n * p, w) @ self.w_o_HExW[...].astype(x_NxPxW.dtype)
            ).reshape(n, p, w)


class VisionBlock(nnx.Module):
  def __init__(self, v, *, eps: float, param_dtype, rngs: nnx.Rngs):
    self.attn_norm = LayerNorm(v.d_model, eps=eps, param_dtype=param_dtype, rngs=rngs)
    self.attn = VisionAttention(v.d_model, v.num_heads, param_dtype=param_dtype, rngs=rngs)
    self.mlp_norm = LayerNorm(v.d_model, eps=eps, param_dtype=param_dtype, rngs=rngs)
    self.mlp = MLP(v.d_model, v.mlp_dim, v.d_model, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_NxPxW):
    x_NxPxW = x_NxPxW + self.attn(self.attn_norm(x_NxPxW))
    return x_NxPxW + self.mlp(self.mlp_norm(x_NxPxW))


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
    n, p, c = patches_NxPxC.shape
    x_NxPxW = (patches_NxPxC.reshape(n * p, c) @ self.patch_embed_CxW[...].astype(
        patches_NxPxC.dtype)).reshape(n, p, -1)
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


def image_cross_mask(segment_ids_BxL, image_ids_BxL, num_images: int, patches: int):
  """[B, 1, L, I*P] bool: may the token at l attend to patch p of image slot i? Only images of
  its own document that start at or before it. Also [B, L, 1]: whether it may attend to any."""
  length = segment_ids_BxL.shape[1]
  slots_I = jnp.arange(num_images)
  is_slot_BxIxL = image_ids_BxL[:, None, :] == slots_I[None, :, None]
  present_BxI = jnp.any(is_slot_BxIxL, axis=-1)
  start_BxI = jnp.argmax(is_slot_BxIxL, axis=-1)
  segment_BxI = jnp.take_along_axis(segment_ids_BxL, start_BxI, axis=1)
  allowed_BxLxI = (present_BxI[:, None, :]
                   & (segment_BxI[:, None, :] == segment_ids_BxL[:, :, None])
                   & (segment_ids_BxL[:, :, None] > 0)
                   & (start_BxI[:, None, :] <= jnp.arange(length)[None, :, None]))
  allowed_BxLxIP = jnp.repeat(allowed_BxLxI, patches, axis=-1)
  return allowed_BxLxIP[:, None], jnp.any(allowed_BxLxI, axis=-1, keepdims=True)


class GatedCrossAttention(nnx.Module):
  """Decoder hidden states attend to one encoder layer's patch features; the result is scaled
  by tanh(gate), gate initialised at 0, so the block starts as the identity (Flamingo)."""

  def __init__(self, d_model: int, width: int, heads: int, *, eps: float, param_dtype,
               rngs: nnx.Rngs):
    self.heads = heads
    self.norm = LayerNorm(d_model, eps=eps, param_dtype=param_dtype, rngs=rngs)
    self.w_q_DxHE = make_param(rngs, fan_in_init(), (d_model, d_model), ("embed", "mlp"),
                               param_dtype)
    self.w_kv_Wx2HE = make_param(rngs, fan_in_init(), (width, 2 * d_model), (None, "mlp"),
                                 param_dtype)
    self.w_o_HExD = make_param(rngs, fan_in_init(), (d_model, d_model), ("mlp", "embed"),
                               param_dtype)
    self.gate = make_param(rngs, nnx.initializers.zeros, (1,), (None,), param_dtype)

  def __call__(self, x_BxLxD, features_BxMxW, mask_Bx1xLxM, any_BxLx1):
    b, l, d = x_BxLxD.shape
    m, w = features_BxMxW.shape[1:]
    h, e = self.heads, d // self.heads
    q_BxLxHxE = (self.norm(x_BxLxD).reshape(b * l, d) @ self.w_q_DxHE[...].astype(x_BxLxD.dtype)
                 ).reshape(b, l, h, e)
    kv = (features_BxMxW.reshape(b * m, w) @ self.w_kv_Wx2HE[...].astype(x_BxLxD.dtype))
    k_BxMxHxE, v_BxMxHxE = jnp.split(kv.reshape(b, m, 2 * h, e), 2, axis=2)
    logits_BxHxLxM = jnp.einsum("blhe,bmhe->bhlm", q_BxLxHxE * e ** -0.5, k_BxMxHxE,
                                preferred_element_type=jnp.float32)
    logits_BxHxLxM = jnp.where(mask_Bx1xLxM, logits_BxHxLxM, _MASKED)
    weights = jax.nn.softmax(logits_BxHxLxM, axis=-1).astype(x_BxLxD.dtype)
    out_BxLxHxE = jnp.einsum("bhlm,bmhe->blhe", weights, v_BxMxHxE)
    out_BxLxD = (out_BxLxHxE.reshape(b * l, d) @ self.w_o_HExD[...].astype(x_BxLxD.dtype)
                 ).reshape(b, l, d)
    # A token with no image before it in its document attends to nothing: no update at all.
    out_BxLxD = jnp.where(any_BxLx1, out_BxLxD, 0)
    return x_BxLxD + jnp.tanh(self.gate[...].astype(x_BxLxD.dtype)) * out_BxLxD
