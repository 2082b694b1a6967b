"""The native multimodal model: image patches and text tokens in one decoder.

It reads embed -> decoder -> final norm -> head. The image front end of its fusion mode
(models/fusion.py: early's patch projection, late's ViT + connector and the internal modes'
per-layer injections) fills the image positions of the embeddings and gives the decoder what it
injects before chosen layers. The model returns final hidden states; the LM head is applied by
the loss (see train/loss.py) so the [tokens, vocab] logits never need to exist all at once.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from nmm_jax import sharding
from nmm_jax.models import attention_kernels, fusion
from nmm_jax.models.attention import attention_mask
from nmm_jax.models.decoder import Decoder
from nmm_jax.models.layers import RESIDUAL, RMSNorm, fan_in_init, make_param


def real_tokens_BxL(batch):
  """The positions that hold tokens: segment id 0 is padding. MoE layers route these and
  average their statistics over them."""
  return batch["segment_ids"] > 0


class NMM(nnx.Module):
  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.param_dtype)
    self.compute_dtype = jnp.dtype(cfg.dtype)
    self.tie_embeddings = cfg.tie_embeddings
    # Static: the mask the decoder's attention reads ("auto" is decided here, for the default
    # backend, unless the train program already decided it for its mesh's devices).
    cfg = attention_kernels.resolved(cfg)
    self.attention = cfg.attention
    self.embed_VxD = make_param(rngs, nnx.initializers.normal(0.02), (cfg.vocab_size, cfg.d_model),
                                ("vocab", "embed"), dtype)
    # The front end is static; its parameters are this model's own attributes, so their paths
    # (patch_proj_PxD; vision, connector, fusion_blocks) are the ones checkpoints and exports use.
    self.front_end = fusion.front_end(cfg)
    for name, node in self.front_end.params(cfg, dtype, rngs).items():
      setattr(self, name, node)
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

  def embed(self, batch, images):
    """Token embeddings, the image positions filled by the front end from `images` (its
    `encode` of the batch; None without images)."""
    x_BxLxD = jnp.take(self.embed_VxD[...], batch["tokens"], axis=0).astype(self.compute_dtype)
    x_BxLxD = sharding.constrain(x_BxLxD, RESIDUAL)
    return sharding.constrain(self.front_end.embed(self, x_BxLxD, batch, images), RESIDUAL)

  def forward(self, batch):
    """(final hidden states [B, L, D] after the final norm, MoE statistics per layer: {} for
    dense decoders)."""
    mask = attention_kernels.attention_mask_for(self.attention, batch["segment_ids"],
                                                batch["image_ids"], attention_mask)
    images = self.front_end.encode(self, batch)
    x_BxLxD, moe_stats = self.decoder(
        self.embed(batch, images), batch["positions"], mask,
        self.front_end.injections(self, batch, images), is_image_BxL=batch["image_ids"] >= 0,
        valid_BxL=real_tokens_BxL(batch))
    return self.final_norm(x_BxLxD), moe_stats

  def __call__(self, batch):
    """Final hidden states [B, L, D] (after the final norm)."""
    return self.forward(batch)[0]

  def logits(self, batch):
    return self._head(self(batch))

  def _head(self, hidden_BxLxD):
    head_DxV = self.head_weight_DxV().astype(hidden_BxLxD.dtype)
    return jnp.einsum("bld,dv->blv", hidden_BxLxD, head_DxV, preferred_element_type=jnp.float32)

  # Decoding with a key/value cache. The prompt is left-padded (padding first, segment id 0), so
  # every sequence of the batch writes its next token at the same cache position.

  def prefill(self, prompt, length: int):
    """Runs the prompt ([B, P] batch-contract arrays, `images` optional) and caches its keys
    and values in a cache of `length` >= P positions. Returns (logits of each sequence's next
    token [B, V] f32, the decoding state for `decode`)."""
    b, p = prompt["tokens"].shape
    images = self.front_end.encode(self, prompt)
    valid_BxP = real_tokens_BxL(prompt)
    mask = attention_kernels.attention_mask_for(self.attention, prompt["segment_ids"],
                                                prompt["image_ids"], attention_mask)
    if not isinstance(mask, attention_kernels.KeyRanges):
      # The dense mask covers the whole cache; with key ranges (flash) the prompt attends over
      # its own keys in the kernel (the cache holds nothing before it).
      mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, length - p)))
    cache = self.decoder.init_cache(b, length, self.compute_dtype)
    x_BxPxD, cache = self.decoder.cached(
        self.embed(prompt, images), prompt["positions"], mask, cache, 0,
        self.front_end.injections(self, prompt, images), is_image_BxL=prompt["image_ids"] >= 0,
        valid_BxL=valid_BxP)
    state = {"cache": cache, "write_at": jnp.asarray(p, jnp.int32),
             "key_valid_BxT": jnp.pad(valid_BxP, ((0, 0), (0, length - p))),
             "position_B": prompt["positions"][:, -1] + 1,
             "images": self.front_end.decode_state(images)}
    return self._head(self.final_norm(x_BxPxD[:, -1:]))[:, 0], state

  def decode(self, tokens_B, state):
    """One more text token per sequence: (logits of the next one [B, V] f32, the new state)."""
    write_at = state["write_at"]
    key_valid_BxT = jax.lax.dynamic_update_slice_in_dim(
        state["key_valid_BxT"], jnp.ones((tokens_B.shape[0], 1), bool), write_at, axis=1)
    positions_Bx1 = state["position_B"][:, None]
    step = {"tokens": tokens_B[:, None]}  # text only: what the prompt's images give is in state
    x_Bx1xD, cache = self.decoder.cached(
        self.embed(step, None), positions_Bx1, key_valid_BxT[:, None, None, :], state["cache"],
        write_at, self.front_end.injections(self, step, state["images"]))
    state = {**state, "cache": cache, "write_at": write_at + 1, "key_valid_BxT": key_valid_BxT,
             "position_B": state["position_B"] + 1}
    return self._head(self.final_norm(x_Bx1xD))[:, 0], state
