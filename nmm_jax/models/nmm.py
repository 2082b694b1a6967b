"""The native multimodal model: image patches and text tokens in one decoder.

`fusion="early"`: raw normalised patches -> one linear layer -> the decoder, no vision encoder.
The model returns final hidden states; the LM head is applied by the loss (see train/loss.py) so
the [tokens, vocab] logits never need to exist all at once.
"""
import jax.numpy as jnp
from flax import nnx

from nmm_jax.models.attention import attention_mask
from nmm_jax.models.decoder import Decoder
from nmm_jax.models.layers import RMSNorm, fan_in_init, make_param


def patchify(images_BxIxHxWxC, patch_size: int):
  """uint8 images -> [B, I, P, p*p*C] patches in row-major patch order, normalised to [-1, 1]."""
  b, i, h, w, c = images_BxIxHxWxC.shape
  p = patch_size
  x = images_BxIxHxWxC.reshape(b, i, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, i, (h // p) * (w // p), p * p * c)
  return x.astype(jnp.float32) / 127.5 - 1.0


class NMM(nnx.Module):
  def __init__(self, cfg, *, rngs: nnx.Rngs):
    if cfg.fusion != "early":
      raise NotImplementedError(f"model.fusion={cfg.fusion!r} is not built yet")
    dtype = jnp.dtype(cfg.param_dtype)
    self.compute_dtype = jnp.dtype(cfg.dtype)
    self.patch_size = cfg.patch_size
    self.tie_embeddings = cfg.tie_embeddings
    patch_dim = cfg.patch_size * cfg.patch_size * cfg.num_channels
    self.embed_VxD = make_param(rngs, nnx.initializers.normal(0.02), (cfg.vocab_size, cfg.d_model),
                                ("vocab", "embed"), dtype)
    self.patch_proj_PxD = make_param(rngs, fan_in_init(), (patch_dim, cfg.d_model),
                                     (None, "embed"), dtype)
    self.decoder = Decoder(cfg, rngs=rngs)
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, axis_name="embed", param_dtype=dtype,
                              rngs=rngs)
    if not cfg.tie_embeddings:
      self.head_DxV = make_param(rngs, fan_in_init(), (cfg.d_model, cfg.vocab_size),
                                 ("embed", "vocab"), dtype)

  def head_weight_DxV(self):
    if self.tie_embeddings:
      return self.embed_VxD[...].T
    return self.head_DxV[...]

  def embed(self, batch):
    """Token embeddings, with each image position replaced by its projected patch."""
    tokens_BxL = batch["tokens"]
    x_BxLxD = jnp.take(self.embed_VxD[...], tokens_BxL, axis=0)
    if "images" not in batch:  # text-only batches (benchmarks, text evaluation)
      return x_BxLxD.astype(self.compute_dtype)
    patches_BxIxPxC = patchify(batch["images"], self.patch_size).astype(self.compute_dtype)
    b, i, p, _ = patches_BxIxPxC.shape
    patch_emb_BxNxD = jnp.einsum("bipc,cd->bipd", patches_BxIxPxC,
                                 self.patch_proj_PxD[...].astype(self.compute_dtype)
                                 ).reshape(b, i * p, -1)
    image_ids_BxL, patch_ids_BxL = batch["image_ids"], batch["patch_ids"]
    is_image_BxL = image_ids_BxL >= 0
    flat_index_BxL = jnp.where(is_image_BxL, image_ids_BxL * p + patch_ids_BxL, 0)
    image_x_BxLxD = jnp.take_along_axis(patch_emb_BxNxD, flat_index_BxL[..., None], axis=1)
    return jnp.where(is_image_BxL[..., None], image_x_BxLxD, x_BxLxD.astype(self.compute_dtype))

  def __call__(self, batch):
    """Final hidden states [B, L, D] (after the final norm)."""
    mask_Bx1xLxL = attention_mask(batch["segment_ids"], batch["image_ids"])
    x_BxLxD = self.decoder(self.embed(batch), batch["positions"], mask_Bx1xLxL)
    return self.final_norm(x_BxLxD)

  def logits(self, batch):
    hidden_BxLxD = self(batch)
    return jnp.einsum("bld,dv->blv", hidden_BxLxD,
                      self.head_weight_DxV().astype(hidden_BxLxD.dtype)).astype(jnp.float32)
