"""The native multimodal model: image patches and text tokens in one decoder.

`fusion="early"`: raw normalised patches -> one linear layer -> the decoder, no vision encoder.
`fusion="late"`: patches -> a ViT (models/vision.py) -> a 2-layer GELU connector -> the decoder,
with `vision_fusion` choosing how encoder layers reach it:
  none            the last encoder layer only (plain late fusion);
  input_concat    the `vision_layers` concatenated along channels before the connector;
  internal_add    the last listed layer is the input; each other one goes through its own MLP
                  and is added to the residual stream at the image positions, just before
                  decoder layer `fusion_decoder_layers[i]`;
  internal_xattn  the last listed layer is the input; each other one is cross-attended by a
                  tanh-gated (zero-initialised) block before decoder layer
                  `fusion_decoder_layers[i]`.
The model returns final hidden states; the LM head is applied by the loss (see train/loss.py) so
the [tokens, vocab] logits never need to exist all at once.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from nmm_jax.config import vision_layer_plan
from nmm_jax.models.attention import attention_mask
from nmm_jax.models.decoder import Decoder
from nmm_jax.models.layers import RMSNorm, fan_in_init, make_param
from nmm_jax.models.vision import MLP, GatedCrossAttention, VisionEncoder, image_cross_mask


def patchify(images_BxIxHxWxC, patch_size: int):
  """uint8 images -> [B, I, P, p*p*C] patches in row-major patch order, normalised to [-1, 1]."""
  b, i, h, w, c = images_BxIxHxWxC.shape
  p = patch_size
  x = images_BxIxHxWxC.reshape(b, i, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, i, (h // p) * (w // p), p * p * c)
  return x.astype(jnp.float32) / 127.5 - 1.0


class NMM(nnx.Module):
  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.param_dtype)
    self.compute_dtype = jnp.dtype(cfg.dtype)
    self.patch_size = cfg.patch_size
    self.tie_embeddings = cfg.tie_embeddings
    self.fusion, self.vision_fusion = cfg.fusion, cfg.vision_fusion
    patch_dim = cfg.patch_size * cfg.patch_size * cfg.num_channels
    self.embed_VxD = make_param(rngs, nnx.initializers.normal(0.02), (cfg.vocab_size, cfg.d_model),
                                ("vocab", "embed"), dtype)
    if cfg.fusion == "early":
      self.patch_proj_PxD = make_param(rngs, fan_in_init(), (patch_dim, cfg.d_model),
                                       (None, "embed"), dtype)
    else:
      v = cfg.vision
      self.freeze_vision = v.freeze
      self.vision = VisionEncoder(v, patch_dim, eps=cfg.norm_eps, param_dtype=dtype, rngs=rngs,
                                  scan_unroll=cfg.scan_unroll, remat=cfg.remat)
      self.input_layers, self.injected = vision_layer_plan(cfg)
      self.connector = MLP(len(self.input_layers) * v.d_model, cfg.d_model, cfg.d_model,
                           param_dtype=dtype, rngs=rngs)
      if cfg.vision_fusion == "internal_add":
        self.fusion_blocks = nnx.List([MLP(v.d_model, cfg.d_model, cfg.d_model, param_dtype=dtype,
                                           rngs=rngs) for _ in self.injected])
      elif cfg.vision_fusion == "internal_xattn":
        self.fusion_blocks = nnx.List([
            GatedCrossAttention(cfg.d_model, v.d_model, cfg.num_heads, eps=cfg.norm_eps,
                                param_dtype=dtype, rngs=rngs) for _ in self.injected])
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

  def encoder_layers(self, batch):
    """Late fusion: every encoder layer's patch features, [J, B, I*P, W]."""
    patches_BxIxPxC = patchify(batch["images"], self.patch_size).astype(self.compute_dtype)
    b, i, p, c = patches_BxIxPxC.shape
    every_JxNxPxW = self.vision(patches_BxIxPxC.reshape(b * i, p, c))
    if self.freeze_vision:
      every_JxNxPxW = jax.lax.stop_gradient(every_JxNxPxW)
    return every_JxNxPxW.reshape(every_JxNxPxW.shape[0], b, i * p, -1)

  @staticmethod
  def _at_tokens(per_patch_BxNxD, batch):
    """Per-patch vectors [B, I*P, D] -> [B, L, D] at each token's image patch (0 for text)."""
    image_ids_BxL, patch_ids_BxL = batch["image_ids"], batch["patch_ids"]
    patches = per_patch_BxNxD.shape[1] // batch["images"].shape[1]
    is_image_BxL = image_ids_BxL >= 0
    flat_index_BxL = jnp.where(is_image_BxL, image_ids_BxL * patches + patch_ids_BxL, 0)
    at_BxLxD = jnp.take_along_axis(per_patch_BxNxD, flat_index_BxL[..., None], axis=1)
    return jnp.where(is_image_BxL[..., None], at_BxLxD, 0).astype(per_patch_BxNxD.dtype)

  def embed(self, batch, encoder_layers=None):
    """Token embeddings, with each image position replaced by its patch's embedding."""
    tokens_BxL = batch["tokens"]
    x_BxLxD = jnp.take(self.embed_VxD[...], tokens_BxL, axis=0).astype(self.compute_dtype)
    if "images" not in batch:  # text-only batches (benchmarks, text evaluation)
      return x_BxLxD
    if self.fusion == "early":
      patches_BxIxPxC = patchify(batch["images"], self.patch_size).astype(self.compute_dtype)
      b, i, p, _ = patches_BxIxPxC.shape
      image_BxNxD = jnp.einsum("bipc,cd->bipd", patches_BxIxPxC,
                               self.patch_proj_PxD[...].astype(self.compute_dtype)
                               ).reshape(b, i * p, -1)
    else:
      if encoder_layers is None:
        encoder_layers = self.encoder_layers(batch)
      image_BxNxD = self.connector(jnp.concatenate([encoder_layers[j] for j in self.input_layers],
                                                   axis=-1))
    is_image_BxLx1 = (batch["image_ids"] >= 0)[..., None]
    return jnp.where(is_image_BxLx1, self._at_tokens(image_BxNxD, batch), x_BxLxD)

  def _image_cross(self, batch, encoder_layers):
    """internal_xattn: (mask [B, 1, L, I*P], any [B, L, 1]) of the patches each token may
    cross-attend to."""
    num_images = batch["images"].shape[1]
    return image_cross_mask(batch["segment_ids"], batch["image_ids"], num_images,
                            encoder_layers.shape[2] // num_images)

  def injections(self, batch, encoder_layers, cross=None):
    """{decoder layer: fn(x) -> x} for the internal fusion modes.

    `cross`: internal_xattn's (mask, any) for the batch's tokens, computed from the batch when
    not given (decoded tokens carry no images: they get the prompt's). internal_add adds at
    image positions only, so a batch without images gets nothing."""
    if self.fusion != "late" or not self.injected or encoder_layers is None:
      return None
    before = {}
    if self.vision_fusion == "internal_add":
      if "images" not in batch:
        return None
      for (j, layer), mlp in zip(self.injected, self.fusion_blocks):
        added_BxLxD = self._at_tokens(mlp(encoder_layers[j]), batch)
        before[layer] = lambda x, added=added_BxLxD: x + added.astype(x.dtype)
    else:
      mask_Bx1xLxM, any_BxLx1 = (cross if cross is not None
                                 else self._image_cross(batch, encoder_layers))
      for (j, layer), xattn in zip(self.injected, self.fusion_blocks):
        before[layer] = (lambda x, block=xattn, feats=encoder_layers[j]:
                         block(x, feats, mask_Bx1xLxM, any_BxLx1))
    return before

  def forward(self, batch):
    """(final hidden states [B, L, D] after the final norm, MoE statistics per layer: {} for
    dense decoders)."""
    mask_Bx1xLxL = attention_mask(batch["segment_ids"], batch["image_ids"])
    encoder_layers = (self.encoder_layers(batch)
                      if self.fusion == "late" and "images" in batch else None)
    x_BxLxD, moe_stats = self.decoder(
        self.embed(batch, encoder_layers), batch["positions"], mask_Bx1xLxL,
        self.injections(batch, encoder_layers), is_image_BxL=batch["image_ids"] >= 0,
        valid_BxL=batch["segment_ids"] > 0)
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
    has_images = "images" in prompt
    encoder_layers = (self.encoder_layers(prompt)
                      if self.fusion == "late" and has_images else None)
    valid_BxP = prompt["segment_ids"] > 0
    mask_Bx1xPxT = jnp.pad(attention_mask(prompt["segment_ids"], prompt["image_ids"]),
                           ((0, 0), (0, 0), (0, 0), (0, length - p)))
    xattn = encoder_layers is not None and self.vision_fusion == "internal_xattn"
    cross = self._image_cross(prompt, encoder_layers) if xattn else None
    cache = self.decoder.init_cache(b, length, self.compute_dtype)
    x_BxPxD, cache = self.decoder.cached(
        self.embed(prompt, encoder_layers), prompt["positions"], mask_Bx1xPxT, cache, 0,
        self.injections(prompt, encoder_layers, cross), is_image_BxL=prompt["image_ids"] >= 0,
        valid_BxL=valid_BxP)
    state = {"cache": cache, "write_at": jnp.asarray(p, jnp.int32),
             "key_valid_BxT": jnp.pad(valid_BxP, ((0, 0), (0, length - p))),
             "position_B": prompt["positions"][:, -1] + 1}
    if xattn:
      # Every prompt image starts before the tokens to come, in their document: the last prompt
      # position's cross-attention mask is theirs.
      mask_Bx1xPxM, any_BxPx1 = cross
      state.update(encoder_layers=encoder_layers, cross_mask=mask_Bx1xPxM[:, :, -1:],
                   cross_any=any_BxPx1[:, -1:])
    return self._head(self.final_norm(x_BxPxD[:, -1:]))[:, 0], state

  def decode(self, tokens_B, state):
    """One more text token per sequence: (logits of the next one [B, V] f32, the new state)."""
    write_at = state["write_at"]
    key_valid_BxT = jax.lax.dynamic_update_slice_in_dim(
        state["key_valid_BxT"], jnp.ones((tokens_B.shape[0], 1), bool), write_at, axis=1)
    positions_Bx1 = state["position_B"][:, None]
    step = {"tokens": tokens_B[:, None]}
    encoder_layers = state.get("encoder_layers")
    cross = (state["cross_mask"], state["cross_any"]) if encoder_layers is not None else None
    x_Bx1xD, cache = self.decoder.cached(
        self.embed(step), positions_Bx1, key_valid_BxT[:, None, None, :], state["cache"],
        write_at, self.injections(step, encoder_layers, cross))
    state = {**state, "cache": cache, "write_at": write_at + 1, "key_valid_BxT": key_valid_BxT,
             "position_B": state["position_B"] + 1}
    return self._head(self.final_norm(x_Bx1xD))[:, 0], state
