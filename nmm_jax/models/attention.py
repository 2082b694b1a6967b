"""Grouped-query self-attention with RoPE and QK-norm, and the packed multimodal attention mask."""
import jax
import jax.numpy as jnp
from flax import nnx

from nmm_jax import sharding
from nmm_jax.models import attention_kernels
from nmm_jax.models.dense import dense
from nmm_jax.models.layers import RMSNorm, apply_rope, fan_in_init, make_param

_HEADS = ("batch", "activation_q_length", "activation_heads", None)
_KV_HEADS = ("batch", "activation_kv_length", "activation_kv_heads", None)

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


def dot_product_attention(q_BxLxHxE, k_BxMxKxE, v_BxMxKxE, mask_Bx1xLxM):
  """model.attention="xla": the scores [B, H, L, M] in XLA, masked by the dense mask. Outputs
  [B, L, H, E] in q's dtype."""
  e = q_BxLxHxE.shape[-1]
  groups = q_BxLxHxE.shape[2] // k_BxMxKxE.shape[2]
  if groups > 1:
    # GQA: kv head j serves query heads j*G .. j*G+G-1 (the Hugging Face order, so exported
    # weights need no permutation). Repeating k and v to H heads keeps both attention matmuls
    # plain 4-d batched matmuls; a grouped 5-d einsum measured 1.7x slower on XLA:CPU.
    k_BxMxHxE = jnp.repeat(k_BxMxKxE, groups, axis=2)
    v_BxMxHxE = jnp.repeat(v_BxMxKxE, groups, axis=2)
  else:
    k_BxMxHxE, v_BxMxHxE = k_BxMxKxE, v_BxMxKxE
  dtype = q_BxLxHxE.dtype
  # Logits and the PV product accumulate in f32 from compute-dtype operands; softmax in f32.
  logits_BxHxLxM = jnp.einsum("blhe,bmhe->bhlm", q_BxLxHxE * (e ** -0.5), k_BxMxHxE,
                              preferred_element_type=jnp.float32)
  logits_BxHxLxM = jnp.where(mask_Bx1xLxM, logits_BxHxLxM, _MASKED)
  # Softmax normalised after the PV product: dividing [B, L, H, E] is cheaper than [B, H, L, L].
  max_BxHxLx1 = jax.lax.stop_gradient(jnp.max(logits_BxHxLxM, axis=-1, keepdims=True))
  exp_BxHxLxM = jnp.exp(logits_BxHxLxM - max_BxHxLx1)
  sum_BxLxH = jnp.moveaxis(jnp.sum(exp_BxHxLxM, axis=-1), 2, 1)
  out_BxLxHxE = jnp.einsum("bhlm,bmhe->blhe", exp_BxHxLxM.astype(dtype), v_BxMxHxE,
                           preferred_element_type=jnp.float32)
  return (out_BxLxHxE / sum_BxLxH[..., None]).astype(dtype)


class Attention(nnx.Module):
  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d, h, k, e = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dtype = jnp.dtype(cfg.param_dtype)
    # Static (not parameters): how the full-sequence path attends (attention_kernels.py).
    self.implementation = cfg.attention
    self.flash_block_q, self.flash_block_k = cfg.flash_block_q, cfg.flash_block_k
    self.w_q_DxHxE = make_param(rngs, fan_in_init(), (d, h, e), ("embed", "heads", None), dtype)
    self.w_k_DxKxE = make_param(rngs, fan_in_init(), (d, k, e), ("embed", "kv_heads", None), dtype)
    self.w_v_DxKxE = make_param(rngs, fan_in_init(), (d, k, e), ("embed", "kv_heads", None), dtype)
    self.w_o_HxExD = make_param(rngs, fan_in_init(2), (h, e, d), ("heads", None, "embed"), dtype)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(e, eps=cfg.norm_eps, axis_name=None, param_dtype=dtype, rngs=rngs)
      self.k_norm = RMSNorm(e, eps=cfg.norm_eps, axis_name=None, param_dtype=dtype, rngs=rngs)
    else:
      self.q_norm = self.k_norm = None

  def _project(self, x_BxLxD, rope):
    """(q [B, L, H, E], k [B, L, K, E], v [B, L, K, E]): QK-norm and RoPE applied."""
    b, l, d = x_BxLxD.shape

    def project(w_DxHxE, heads_axis):
      w_DxHxE = w_DxHxE[...].astype(x_BxLxD.dtype)
      return dense(x_BxLxD, w_DxHxE.reshape(d, -1), ("embed", heads_axis)).reshape(
          b, l, *w_DxHxE.shape[1:])

    q_BxLxHxE = sharding.constrain(project(self.w_q_DxHxE, "heads"), _HEADS)
    k_BxLxKxE = sharding.constrain(project(self.w_k_DxKxE, "kv_heads"), _KV_HEADS)
    v_BxLxKxE = sharding.constrain(project(self.w_v_DxKxE, "kv_heads"), _KV_HEADS)
    if self.q_norm is not None:
      q_BxLxHxE, k_BxLxKxE = self.q_norm(q_BxLxHxE), self.k_norm(k_BxLxKxE)
    return apply_rope(q_BxLxHxE, rope), apply_rope(k_BxLxKxE, rope), v_BxLxKxE

  def _attend(self, q_BxLxHxE, k_BxMxKxE, v_BxMxKxE, mask, implementation="xla"):
    """Queries [B, L] over keys [B, M] (M = L in training, the cache length when decoding),
    then the output projection. `mask`: what attention_kernels.attention_mask_for gives the
    implementation (the dense [B, 1, L, M] mask for "xla")."""
    b, l, h, e = q_BxLxHxE.shape
    out_BxLxHxE = attention_kernels.attend(
        implementation, q_BxLxHxE, k_BxMxKxE, v_BxMxKxE, mask, dot_product_attention,
        block_q=self.flash_block_q, block_k=self.flash_block_k)
    out_BxLxHxE = sharding.constrain(out_BxLxHxE, _HEADS)
    d = self.w_o_HxExD.shape[-1]
    w_o_HExD = self.w_o_HxExD[...].astype(out_BxLxHxE.dtype).reshape(h * e, d)
    return dense(out_BxLxHxE.reshape(b, l, h * e), w_o_HExD, ("heads", "embed"))

  def __call__(self, x_BxLxD, rope, mask):
    return self._attend(*self._project(x_BxLxD, rope), mask, self.implementation)

  def cached(self, x_BxLxD, rope, mask, cache, write_at):
    """Decoding: this call's keys and values are written into `cache` ({"k", "v"}: [B, T, K, E])
    at positions write_at .. write_at + L - 1, and the queries attend over the whole cache
    (`mask` [B, 1, L, T] says which slots). A prefill with flash attention passes KeyRanges
    instead: the prompt (written at 0) attends over its own keys in the kernel. Returns (output,
    updated cache)."""
    q_BxLxHxE, k_BxLxKxE, v_BxLxKxE = self._project(x_BxLxD, rope)
    cache = {name: jax.lax.dynamic_update_slice_in_dim(cache[name], new.astype(cache[name].dtype),
                                                       write_at, axis=1)
             for name, new in (("k", k_BxLxKxE), ("v", v_BxLxKxE))}
    if isinstance(mask, attention_kernels.KeyRanges):
      return self._attend(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, mask, "flash"), cache
    out_BxLxD = self._attend(q_BxLxHxE, cache["k"].astype(q_BxLxHxE.dtype),
                             cache["v"].astype(q_BxLxHxE.dtype), mask)
    return out_BxLxD, cache
