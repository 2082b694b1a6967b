"""Grouped-query self-attention with RoPE and QK-norm, and the packed multimodal attention mask."""
import jax
import jax.numpy as jnp
from flax import nnx

from nmm_jax.models.layers import RMSNorm, apply_rope, fan_in_init, make_param

# Finite rather than -inf: a padding query row masks every key, and -inf would give NaN there.
_MASKED = -1e30


def attention_mask(segment_ids_BxL, image_ids_BxL):
  """[B, 1, L, L] bool: may query q attend to key k?

  Causal inside a document, bidirectional among the patches of one image (image ids are unique
  within a packed sequence), never across documents or into padding (segment id 0).
  """
  q_seg_BxLx1 = segment_ids_BxL[:, :, None]
  k_seg_Bx1xL = segment_ids_BxL[:, None, :]
  same_document = (q_seg_BxLx1 == k_seg_Bx1xL) & (k_seg_Bx1xL != 0)
  length = segment_ids_BxL.shape[1]
  causal_LxL = jnp.arange(length)[:, None] >= jnp.arange(length)[None, :]
  q_img_BxLx1 = image_ids_BxL[:, :, None]
  same_image = (q_img_BxLx1 == image_ids_BxL[:, None, :]) & (q_img_BxLx1 >= 0)
  return (same_document & (causal_LxL[None] | same_image))[:, None]


class Attention(nnx.Module):
  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d, h, k, e = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dtype = jnp.dtype(cfg.param_dtype)
    self.w_q_DxHxE = make_param(rngs, fan_in_init(), (d, h, e), ("embed", "heads", None), dtype)
    self.w_k_DxKxE = make_param(rngs, fan_in_init(), (d, k, e), ("embed", "kv_heads", None), dtype)
    self.w_v_DxKxE = make_param(rngs, fan_in_init(), (d, k, e), ("embed", "kv_heads", None), dtype)
    self.w_o_HxExD = make_param(rngs, fan_in_init(2), (h, e, d), ("heads", None, "embed"), dtype)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(e, eps=cfg.norm_eps, axis_name=None, param_dtype=dtype, rngs=rngs)
      self.k_norm = RMSNorm(e, eps=cfg.norm_eps, axis_name=None, param_dtype=dtype, rngs=rngs)
    else:
      self.q_norm = self.k_norm = None

  def __call__(self, x_BxLxD, rope, mask_Bx1xLxL):
    cast = lambda p: p[...].astype(x_BxLxD.dtype)
    q_BxLxHxE = jnp.einsum("bld,dhe->blhe", x_BxLxD, cast(self.w_q_DxHxE))
    k_BxLxKxE = jnp.einsum("bld,dke->blke", x_BxLxD, cast(self.w_k_DxKxE))
    v_BxLxKxE = jnp.einsum("bld,dke->blke", x_BxLxD, cast(self.w_v_DxKxE))
    if self.q_norm is not None:
      q_BxLxHxE, k_BxLxKxE = self.q_norm(q_BxLxHxE), self.k_norm(k_BxLxKxE)
    q_BxLxHxE = apply_rope(q_BxLxHxE, rope)
    k_BxLxKxE = apply_rope(k_BxLxKxE, rope)

    b, l, h, e = q_BxLxHxE.shape
    kv = k_BxLxKxE.shape[2]
    # Query heads grouped by the kv head they share (GQA): head index = kv_head * G + g, the
    # Hugging Face order, so exported weights need no permutation.
    q_BxLxKxGxE = q_BxLxHxE.reshape(b, l, kv, h // kv, e) * (e ** -0.5)
    logits_BxKxGxLxL = jnp.einsum("blkge,bmke->bkglm", q_BxLxKxGxE, k_BxLxKxE)
    logits_BxKxGxLxL = jnp.where(mask_Bx1xLxL[:, :, None], logits_BxKxGxLxL.astype(jnp.float32),
                                 _MASKED)
    # Softmax normalised after the PV product: dividing [B, L, H, E] is cheaper than [B, H, L, L].
    max_BxKxGxLx1 = jax.lax.stop_gradient(jnp.max(logits_BxKxGxLxL, axis=-1, keepdims=True))
    exp_BxKxGxLxL = jnp.exp(logits_BxKxGxLxL - max_BxKxGxLx1)
    sum_BxLxKxG = jnp.moveaxis(jnp.sum(exp_BxKxGxLxL, axis=-1), 3, 1)
    out_BxLxKxGxE = jnp.einsum("bkglm,bmke->blkge", exp_BxKxGxLxL.astype(x_BxLxD.dtype),
                               v_BxLxKxE)
    out_BxLxKxGxE = out_BxLxKxGxE / sum_BxLxKxG[..., None].astype(x_BxLxD.dtype)
    out_BxLxHxE = out_BxLxKxGxE.reshape(b, l, h, e)
    return jnp.einsum("blhe,hed->bld", out_BxLxHxE, cast(self.w_o_HxExD))
