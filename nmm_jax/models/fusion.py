"""How images enter the decoder: one image front end per fusion mode.

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

A front end holds no arrays: it is a static (hashable) part of the model's graphdef. Its
parameters are attributes of the NMM itself, under the names checkpoints and exports have always
used (`patch_proj_PxD`; `vision`, `connector`, `fusion_blocks`): `params` builds them, NMM
assigns them, and the other methods read them from the model they are given. A new fusion mode
is a class here, picked in `front_end`, plus its check in config.validate().

Shape suffixes as in layers.py and vision.py; N = I*P, a row's patches over all its image slots;
M the patches a token may cross-attend to (also I*P).
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from nmm_jax.config import vision_layer_plan
from nmm_jax.models.dense import dense
from nmm_jax.models.layers import fan_in_init, make_param
from nmm_jax.models.vision import MLP, LayerNorm, VisionEncoder

_MASKED = -1e30


def patchify(images_BxIxHxWxC, patch_size: int):
  """uint8 images -> [B, I, P, p*p*C] patches in row-major patch order, normalised to [-1, 1]."""
  b, i, h, w, c = images_BxIxHxWxC.shape
  p = patch_size
  x = images_BxIxHxWxC.reshape(b, i, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, i, (h // p) * (w // p), p * p * c)
  return x.astype(jnp.float32) / 127.5 - 1.0


def at_tokens(per_patch_BxNxD, batch):
  """Per-patch vectors [B, I*P, D] -> [B, L, D] at each token's image patch (0 for text)."""
  image_ids_BxL, patch_ids_BxL = batch["image_ids"], batch["patch_ids"]
  patches = per_patch_BxNxD.shape[1] // batch["images"].shape[1]
  is_image_BxL = image_ids_BxL >= 0
  flat_index_BxL = jnp.where(is_image_BxL, image_ids_BxL * patches + patch_ids_BxL, 0)
  at_BxLxD = jnp.take_along_axis(per_patch_BxNxD, flat_index_BxL[..., None], axis=1)
  return jnp.where(is_image_BxL[..., None], at_BxLxD, 0).astype(per_patch_BxNxD.dtype)


def _at_image_positions(x_BxLxD, image_BxNxD, batch):
  """x with each image position replaced by its patch's vector."""
  is_image_BxLx1 = (batch["image_ids"] >= 0)[..., None]
  return jnp.where(is_image_BxLx1, at_tokens(image_BxNxD, batch), x_BxLxD)


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
    m = features_BxMxW.shape[1]
    h, e = self.heads, d // self.heads
    q_BxLxHxE = dense(self.norm(x_BxLxD), self.w_q_DxHE[...].astype(x_BxLxD.dtype),
                      ("embed", "mlp")).reshape(b, l, h, e)
    kv = dense(features_BxMxW, self.w_kv_Wx2HE[...].astype(x_BxLxD.dtype), (None, "mlp"))
    k_BxMxHxE, v_BxMxHxE = jnp.split(kv.reshape(b, m, 2 * h, e), 2, axis=2)
    logits_BxHxLxM = jnp.einsum("blhe,bmhe->bhlm", q_BxLxHxE * e ** -0.5, k_BxMxHxE,
                                preferred_element_type=jnp.float32)
    logits_BxHxLxM = jnp.where(mask_Bx1xLxM, logits_BxHxLxM, _MASKED)
    weights = jax.nn.softmax(logits_BxHxLxM, axis=-1).astype(x_BxLxD.dtype)
    out_BxLxHxE = jnp.einsum("bhlm,bmhe->blhe", weights, v_BxMxHxE)
    out_BxLxD = dense(out_BxLxHxE.reshape(b, l, d), self.w_o_HExD[...].astype(x_BxLxD.dtype),
                      ("mlp", "embed"))
    # A token with no image before it in its document attends to nothing: no update at all.
    out_BxLxD = jnp.where(any_BxLx1, out_BxLxD, 0)
    return x_BxLxD + jnp.tanh(self.gate[...].astype(x_BxLxD.dtype)) * out_BxLxD


class FrontEnd:
  """The interface NMM calls; `images` is what `encode` returned (None for a batch without
  images), or when decoding what `decode_state` kept of the prompt's."""

  def params(self, cfg, param_dtype, rngs: nnx.Rngs) -> dict:
    """{NMM attribute name: parameter or module}, created in this order (the init's random
    draws follow it)."""
    raise NotImplementedError

  def encode(self, model, batch):
    """The batch's images, computed once per forward for `embed` and `injections`."""
    raise NotImplementedError

  def embed(self, model, x_BxLxD, batch, images):
    """Token embeddings -> with the image positions holding the images' embeddings."""
    return x_BxLxD

  def injections(self, model, batch, images):
    """{decoder layer: fn(x) -> x} applied just before that layer, or None."""
    return None

  def decode_state(self, images) -> dict:
    """What tokens decoded after the prompt (which carry no images) still need of its images:
    the `images` of their `injections`."""
    return {}


@dataclasses.dataclass(frozen=True)
class EarlyFusion(FrontEnd):
  """Patches -> one linear layer, at the image positions."""
  patch_size: int
  compute_dtype: jnp.dtype

  def params(self, cfg, param_dtype, rngs):
    patch_dim = cfg.patch_size * cfg.patch_size * cfg.num_channels
    return {"patch_proj_PxD": make_param(rngs, fan_in_init(), (patch_dim, cfg.d_model),
                                         (None, "embed"), param_dtype)}

  def encode(self, model, batch):
    """[B, I*P, D]: every patch's embedding."""
    if "images" not in batch:  # text-only batches (benchmarks, text evaluation)
      return None
    patches_BxIxPxC = patchify(batch["images"], self.patch_size).astype(self.compute_dtype)
    b, i, p, c = patches_BxIxPxC.shape
    return dense(patches_BxIxPxC.reshape(b, i * p, c),
                 model.patch_proj_PxD[...].astype(self.compute_dtype), (None, "embed"))

  def embed(self, model, x_BxLxD, batch, images):
    return x_BxLxD if images is None else _at_image_positions(x_BxLxD, images, batch)


@dataclasses.dataclass(frozen=True)
class LateFusion(FrontEnd):
  """vision_fusion none / input_concat: the ViT's `input_layers` (concatenated) -> the
  connector, at the image positions. `injected`: [(encoder layer, decoder layer)] of the
  internal modes (subclasses)."""
  patch_size: int
  compute_dtype: jnp.dtype
  freeze: bool
  input_layers: tuple
  injected: tuple = ()

  def params(self, cfg, param_dtype, rngs):
    v = cfg.vision
    patch_dim = cfg.patch_size * cfg.patch_size * cfg.num_channels
    vision = VisionEncoder(v, patch_dim, eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs,
                           scan_unroll=cfg.scan_unroll, remat=cfg.remat)
    connector = MLP(len(self.input_layers) * v.d_model, cfg.d_model, cfg.d_model,
                    param_dtype=param_dtype, rngs=rngs)
    return {"vision": vision, "connector": connector}

  def encode(self, model, batch):
    """{"encoder_layers": every encoder layer's patch features [J, B, I*P, W]}."""
    if "images" not in batch:
      return None
    patches_BxIxPxC = patchify(batch["images"], self.patch_size).astype(self.compute_dtype)
    b, i, p, c = patches_BxIxPxC.shape
    every_JxNxPxW = model.vision(patches_BxIxPxC.reshape(b * i, p, c))
    if self.freeze:
      every_JxNxPxW = jax.lax.stop_gradient(every_JxNxPxW)
    return {"encoder_layers": every_JxNxPxW.reshape(every_JxNxPxW.shape[0], b, i * p, -1)}

  def embed(self, model, x_BxLxD, batch, images):
    if images is None:
      return x_BxLxD
    layers = images["encoder_layers"]
    image_BxNxD = model.connector(jnp.concatenate([layers[j] for j in self.input_layers],
                                                  axis=-1))
    return _at_image_positions(x_BxLxD, image_BxNxD, batch)


class InternalAdd(LateFusion):
  """Each injected encoder layer -> its own MLP -> added to the residual stream at the image
  positions before its decoder layer."""

  def params(self, cfg, param_dtype, rngs):
    late = super().params(cfg, param_dtype, rngs)  # first: the init's draws follow this order
    return {**late, "fusion_blocks": nnx.List([
        MLP(cfg.vision.d_model, cfg.d_model, cfg.d_model, param_dtype=param_dtype, rngs=rngs)
        for _ in self.injected])}

  def injections(self, model, batch, images):
    # Only image positions receive anything: decoded tokens (no images, nothing kept) get none.
    if not images:
      return None
    before = {}
    for (j, layer), mlp in zip(self.injected, model.fusion_blocks):
      added_BxLxD = at_tokens(mlp(images["encoder_layers"][j]), batch)
      before[layer] = lambda x, added=added_BxLxD: x + added.astype(x.dtype)
    return before


class InternalXattn(LateFusion):
  """Each injected encoder layer is cross-attended (GatedCrossAttention) before its decoder
  layer by the tokens that follow an image of their document."""

  def params(self, cfg, param_dtype, rngs):
    late = super().params(cfg, param_dtype, rngs)  # first: the init's draws follow this order
    return {**late, "fusion_blocks": nnx.List([
        GatedCrossAttention(cfg.d_model, cfg.vision.d_model, cfg.num_heads, eps=cfg.norm_eps,
                            param_dtype=param_dtype, rngs=rngs) for _ in self.injected])}

  def encode(self, model, batch):
    """Also "cross_mask" [B, 1, L, I*P] and "cross_any" [B, L, 1]: the patches each token may
    cross-attend to, and whether there are any (image_cross_mask)."""
    images = super().encode(model, batch)
    if images is None:
      return None
    num_images = batch["images"].shape[1]
    mask_Bx1xLxM, any_BxLx1 = image_cross_mask(
        batch["segment_ids"], batch["image_ids"], num_images,
        images["encoder_layers"].shape[2] // num_images)
    return {**images, "cross_mask": mask_Bx1xLxM, "cross_any": any_BxLx1}

  def injections(self, model, batch, images):
    if not images:
      return None
    before = {}
    for (j, layer), xattn in zip(self.injected, model.fusion_blocks):
      before[layer] = (lambda x, block=xattn, feats=images["encoder_layers"][j]:
                       block(x, feats, images["cross_mask"], images["cross_any"]))
    return before

  def decode_state(self, images):
    # Every prompt image starts before the tokens to come, in their document: the last prompt
    # position's cross-attention mask is theirs.
    if images is None:
      return {}
    return {"encoder_layers": images["encoder_layers"],
            "cross_mask": images["cross_mask"][:, :, -1:], "cross_any": images["cross_any"][:, -1:]}


_LATE = {"none": LateFusion, "input_concat": LateFusion, "internal_add": InternalAdd,
         "internal_xattn": InternalXattn}


def front_end(cfg) -> FrontEnd:
  """The model config's front end (model.fusion, model.vision_fusion)."""
  compute_dtype = jnp.dtype(cfg.dtype)
  if cfg.fusion == "early":
    return EarlyFusion(cfg.patch_size, compute_dtype)
  input_layers, injected = vision_layer_plan(cfg)
  return _LATE[cfg.vision_fusion](cfg.patch_size, compute_dtype, cfg.vision.freeze,
                                  tuple(input_layers), tuple(injected))
