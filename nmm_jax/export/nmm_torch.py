"""nmm_torch: a pure-PyTorch reference of nmm_jax's models, one file that needs only torch and
safetensors. `nmm-export --format=torch` copies it next to the weights, so the folder works
without nmm_jax:

  import nmm_torch                       # from the export folder
  model = nmm_torch.load(folder)         # model.safetensors + nmm_config.json
  logits = model(tokens=..., positions=..., segment_ids=..., image_ids=..., patch_ids=...,
                 images=...)             # the batch contract's arrays, as torch tensors

`embed` / `decode_layers` / `head` are forward's parts, for decoding with a key/value cache
(the `hf-multimodal` export's modeling code calls them; `decode_injections` gives what decoded
tokens receive from the prompt's images).

Covers early fusion, late fusion in every vision_fusion mode, and MoE decoders (learned or
modality routing, dropless or capacity, moe.every). Written for reading and checking, not
speed: each expert runs on every token and is masked. Parameter names are nmm_jax's (the
paths in the model joined by '.'; stacked layers on the leading axis).
"""
import json
import math
import os

import torch
import torch.nn.functional as F

_MASKED = -1e30


def load(folder: str) -> "NMMTorch":
  from safetensors.torch import load_file
  with open(os.path.join(folder, "nmm_config.json")) as f:
    config = json.load(f)
  return NMMTorch(config["model"], load_file(os.path.join(folder, "model.safetensors")))


def patchify(images, patch_size):
  """uint8 [B, I, H, W, C] -> [B, I, P, p*p*C] in [-1, 1], patches in row-major order."""
  b, i, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, i, h // p, p, w // p, p, c).permute(0, 1, 2, 4, 3, 5, 6)
  return x.reshape(b, i, (h // p) * (w // p), p * p * c).float() / 127.5 - 1.0


def rms_norm(x, scale, eps):
  return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale


def layer_norm(x, scale, bias, eps):
  return F.layer_norm(x, x.shape[-1:], scale, bias, eps)


def swiglu(x, w_gate, w_up, w_down):
  return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


def gelu_mlp(x, w_in, w_out):
  return F.gelu(x @ w_in, approximate="tanh") @ w_out  # jax.nn.gelu's default


def rope(x, positions, theta):
  """Half-split rotary embedding of x [B, L, H, E]."""
  e = x.shape[-1]
  freqs = theta ** (-torch.arange(0, e, 2, dtype=torch.float32) / e)
  angle = positions[..., None].float() * freqs  # [B, L, E/2]
  sin, cos = angle.sin()[:, :, None], angle.cos()[:, :, None]
  x1, x2 = x.chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def attention_mask(segment_ids, image_ids):
  """[B, 1, L, L]: causal within a document, bidirectional within an image."""
  same_doc = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)
  length = segment_ids.shape[1]
  causal = torch.arange(length)[:, None] >= torch.arange(length)[None, :]
  same_image = (image_ids[:, :, None] == image_ids[:, None, :]) & (image_ids[:, :, None] >= 0)
  return (same_doc & (causal[None] | same_image))[:, None]


def image_cross_mask(segment_ids, image_ids, num_images, patches):
  """([B, 1, L, I*P] may token l attend to image slot i's patches, [B, L, 1] to any)."""
  length = segment_ids.shape[1]
  is_slot = image_ids[:, None, :] == torch.arange(num_images)[None, :, None]  # [B, I, L]
  present = is_slot.any(-1)
  start = is_slot.int().argmax(-1)
  segment = torch.gather(segment_ids, 1, start)
  allowed = (present[:, None, :] & (segment[:, None, :] == segment_ids[:, :, None])
             & (segment_ids[:, :, None] > 0)
             & (start[:, None, :] <= torch.arange(length)[None, :, None]))  # [B, L, I]
  return allowed.repeat_interleave(patches, dim=-1)[:, None], allowed.any(-1, keepdim=True)


def softmax_attention(q, k, v, mask):
  """q [B, L, H, E], k/v [B, M, H, E], mask [B, 1, L, M] -> [B, L, H, E]."""
  logits = torch.einsum("blhe,bmhe->bhlm", q * q.shape[-1] ** -0.5, k)
  weights = torch.where(mask, logits, torch.tensor(_MASKED)).softmax(-1)
  return torch.einsum("bhlm,bmhe->blhe", weights, v)


class NMMTorch(torch.nn.Module):
  def __init__(self, model_config: dict, tensors: dict):
    super().__init__()
    self.m = model_config
    self.params = torch.nn.ParameterDict({
        name.replace(".", "/"): torch.nn.Parameter(t.float(), requires_grad=False)
        for name, t in tensors.items()})

  def p(self, name):
    return self.params[name.replace(".", "/")]

  def _layer(self, i, name):
    """Decoder layer i's parameter `name` (e.g. "attn.w_q_DxHxE")."""
    moe = self.m["moe"]
    first, every = moe.get("first_dense_layers", 0) if moe["num_experts"] else 0, moe["every"]
    if i < first:
      return self.p(f"decoder.dense_blocks.{name}")[i]
    i -= first
    if not moe["num_experts"] or every == 1:
      return self.p(f"decoder.blocks.{name}")[i]
    group, j = divmod(i, every)
    if j == every - 1:
      return self.p(f"decoder.blocks.moe_block.{name}")[group]
    return self.p(f"decoder.blocks.dense.{name}")[group, j]

  # -- decoder -----------------------------------------------------------------------------

  def _attention(self, i, x, positions, mask, kv=None):
    """`kv` (optional): (k, v) [B, L, K, E] after RoPE -> the keys and values to attend
    over, [B, M, K, E]: a key/value cache's update (decoding)."""
    m = self.m
    w = lambda n: self._layer(i, f"attn.{n}")
    b, l, d = x.shape
    q = (x @ w("w_q_DxHxE").reshape(d, -1)).reshape(b, l, m["num_heads"], m["head_dim"])
    k = (x @ w("w_k_DxKxE").reshape(d, -1)).reshape(b, l, m["num_kv_heads"], m["head_dim"])
    v = (x @ w("w_v_DxKxE").reshape(d, -1)).reshape(b, l, m["num_kv_heads"], m["head_dim"])
    if m["qk_norm"]:
      q = rms_norm(q, w("q_norm.scale"), m["norm_eps"])
      k = rms_norm(k, w("k_norm.scale"), m["norm_eps"])
    q, k = rope(q, positions, m["rope_theta"]), rope(k, positions, m["rope_theta"])
    if kv is not None:
      k, v = kv(k, v)
    groups = m["num_heads"] // m["num_kv_heads"]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    out = softmax_attention(q, k, v, mask).reshape(b, l, -1)
    return out @ w("w_o_HxExD").reshape(-1, d)

  def _is_moe(self, i):
    moe = self.m["moe"]
    first, every = moe.get("first_dense_layers", 0), moe["every"]
    return moe["num_experts"] > 0 and i >= first and (i - first) % every == every - 1

  def _moe(self, i, x, is_image):
    cfg = self.m["moe"]
    w = lambda n: self._layer(i, f"mlp.{n}")
    experts, k = cfg["num_experts"], cfg["top_k"]
    logits = x @ w("w_router_DxX")  # [B, L, X]
    allowed = torch.ones_like(logits, dtype=torch.bool)
    if cfg["routing"] == "modality":
      allowed = (torch.arange(experts) < experts // 2) == is_image[..., None]
      logits = torch.where(allowed, logits, torch.tensor(_MASKED))
    probs = logits.softmax(-1)
    # Chosen by probability (+ the balancing bias, for selection only); weighted by probability,
    # renormalised over the k chosen when top_k > 1 and normalize_topk (top-1: the probability).
    choice = probs
    if cfg.get("balance", "aux_loss") == "bias":
      choice = torch.where(allowed, probs + w("router_bias_X"), torch.tensor(-math.inf))
    top_ids = choice.topk(k, dim=-1).indices  # [B, L, K]
    weights = probs.gather(-1, top_ids)
    if k > 1 and cfg.get("normalize_topk", True):
      weights = weights / weights.sum(-1, keepdim=True)
    b, l, _ = x.shape
    keep = torch.ones_like(top_ids, dtype=torch.bool)
    if cfg["capacity_factor"] > 0:
      # Per sequence, in (token, k) order: the first C assignments to each expert are kept.
      capacity = math.ceil(cfg["capacity_factor"] * l * k / experts)
      one_hot = F.one_hot(top_ids.reshape(b, l * k), experts)  # [B, L*K, X]
      rank = ((one_hot.cumsum(1) - 1) * one_hot).sum(-1).reshape(b, l, k)
      keep = rank < capacity
    y = torch.zeros_like(x)
    gate, up, down = w("w_gate_XxDxF"), w("w_up_XxDxF"), w("w_down_XxFxD")
    for e in range(experts):
      share = (weights * ((top_ids == e) & keep)).sum(-1, keepdim=True)  # [B, L, 1]
      y = y + share * swiglu(x, gate[e], up[e], down[e])
    if cfg.get("num_shared_experts", 0):
      y = y + swiglu(x, w("shared.w_gate_DxF"), w("shared.w_up_DxF"), w("shared.w_down_FxD"))
    return y

  # -- vision ------------------------------------------------------------------------------

  def _encoder_layers(self, patches):
    """[B*I, P, C] patches -> every encoder layer's output, a list of [B*I, P, W]."""
    v, eps = self.m["vision"], self.m["norm_eps"]
    p = lambda n: self.p(f"vision.{n}")
    x = patches @ p("patch_embed_CxW") + p("pos_embed_PxW")
    x = layer_norm(x, p("pre_norm.scale"), p("pre_norm.bias"), eps)
    n, length, width = x.shape
    # vision.head_dim 0 (or absent, in older exports): heads split the width exactly.
    heads = v["num_heads"]
    head_dim = v.get("head_dim") or width // heads
    outs = []
    for j in range(v["num_layers"]):
      blk = lambda name: p(f"blocks.{name}")[j]
      h = layer_norm(x, blk("attn_norm.scale"), blk("attn_norm.bias"), eps)
      # Columns head-major: [W, H, 3, E].
      qkv = (h @ blk("attn.w_qkv_WxHx3xE").reshape(width, -1)).reshape(n, length, heads, 3,
                                                                       head_dim)
      q, k, vv = qkv.unbind(3)
      full = torch.ones(n, 1, length, length, dtype=torch.bool)
      attended = softmax_attention(q, k, vv, full).reshape(n, length, heads * head_dim)
      x = x + attended @ blk("attn.w_o_HxExW").reshape(heads * head_dim, width)
      h = layer_norm(x, blk("mlp_norm.scale"), blk("mlp_norm.bias"), eps)
      x = x + gelu_mlp(h, blk("mlp.w_in_CxF"), blk("mlp.w_out_FxD"))
      outs.append(x)
    return outs

  def _layer_plan(self):
    depth = self.m["vision"]["num_layers"]
    layers = [j % depth for j in self.m["vision_layers"]]
    mode = self.m["vision_fusion"]
    if mode == "none":
      return [depth - 1], []
    if mode == "input_concat":
      return layers, []
    return [layers[-1]], list(zip(layers[:-1], self.m["fusion_decoder_layers"]))

  @staticmethod
  def _at_tokens(per_patch, image_ids, patch_ids, patches):
    """[B, I*P, D] -> [B, L, D] at each token's patch (0 for text)."""
    is_image = image_ids >= 0
    index = torch.where(is_image, image_ids * patches + patch_ids, 0)
    at = torch.gather(per_patch, 1, index[..., None].expand(-1, -1, per_patch.shape[-1]))
    return torch.where(is_image[..., None], at, torch.zeros(()))

  def _cross_attention(self, n, x, features, mask, any_image):
    p = lambda name: self.p(f"fusion_blocks.{n}.{name}")
    b, l, d = x.shape
    heads = self.m["num_heads"]
    e = d // heads
    q = (layer_norm(x, p("norm.scale"), p("norm.bias"), self.m["norm_eps"]) @ p("w_q_DxHE")
         ).reshape(b, l, heads, e)
    k, v = (features @ p("w_kv_Wx2HE")).reshape(b, features.shape[1], 2 * heads, e).chunk(2, 2)
    out = softmax_attention(q, k, v, mask).reshape(b, l, d) @ p("w_o_HExD")
    return x + torch.tanh(p("gate")) * torch.where(any_image, out, torch.zeros(()))

  # -- the model ---------------------------------------------------------------------------

  @torch.no_grad()
  def forward(self, tokens, positions, segment_ids, image_ids, patch_ids=None, images=None):
    """Logits [B, L, V] of a batch (images [B, I, H, W, C] uint8, or None: text only)."""
    x, before, _ = self.embed(tokens, segment_ids, image_ids, patch_ids, images)
    mask = attention_mask(segment_ids, image_ids)
    return self.head(self.decode_layers(x, positions, mask, image_ids >= 0, before))

  def embed(self, tokens, segment_ids, image_ids, patch_ids=None, images=None):
    """(embeddings [B, L, D] with the image positions filled, {decoder layer: what is applied to
    the residual before it}, what later decoded tokens need of the images: `decode_injections`)."""
    m = self.m
    x = self.p("embed_VxD")[tokens]
    is_image = image_ids >= 0
    before, image_state = {}, None
    if images is not None:
      patches = patchify(images, m["patch_size"])
      b, i, p, c = patches.shape
      if m["fusion"] == "early":
        image = (patches @ self.p("patch_proj_PxD")).reshape(b, i * p, -1)
      else:
        layers = [o.reshape(b, i * p, -1) for o in self._encoder_layers(patches.reshape(-1, p, c))]
        inputs, injected = self._layer_plan()
        image = gelu_mlp(torch.cat([layers[j] for j in inputs], -1),
                         self.p("connector.w_in_CxF"), self.p("connector.w_out_FxD"))
        if m["vision_fusion"] == "internal_add":
          for n, (j, layer) in enumerate(injected):
            added = self._at_tokens(gelu_mlp(layers[j], self.p(f"fusion_blocks.{n}.w_in_CxF"),
                                             self.p(f"fusion_blocks.{n}.w_out_FxD")),
                                    image_ids, patch_ids, p)
            before[layer] = lambda x, added=added: x + added
        elif m["vision_fusion"] == "internal_xattn":
          cross_mask, any_image = image_cross_mask(segment_ids, image_ids, i, p)
          # The prompt's last position (left-padded prompts: a real token) follows every image
          # of its document, so its cross-attention mask is that of every token decoded after.
          image_state = {"features": [layers[j] for j, _ in injected],
                         "cross_mask": cross_mask[:, :, -1:], "cross_any": any_image[:, -1:]}
          for n, (j, layer) in enumerate(injected):
            before[layer] = (lambda x, n=n, feats=layers[j]:
                             self._cross_attention(n, x, feats, cross_mask, any_image))
      x = torch.where(is_image[..., None], self._at_tokens(image, image_ids, patch_ids, p), x)
    return x, before, image_state

  def decode_injections(self, image_state):
    """`embed`'s `before` for text tokens decoded after a prompt: internal_xattn's
    cross-attention to the prompt's images; nothing in the other modes (only image positions
    receive anything there)."""
    if image_state is None:
      return {}
    _, injected = self._layer_plan()
    return {layer: (lambda x, n=n, feats=image_state["features"][n]:
                    self._cross_attention(n, x, feats, image_state["cross_mask"],
                                          image_state["cross_any"]))
            for n, (_, layer) in enumerate(injected)}

  def decode_layers(self, x, positions, mask, is_image, before, kv=None):
    """The decoder over embeddings x [B, L, D], then the final norm. `kv` (optional):
    (layer, k, v) -> the keys and values to attend over (a key/value cache's update)."""
    eps = self.m["norm_eps"]
    for layer in range(self.m["num_layers"]):
      if layer in before:
        x = before[layer](x)
      x = x + self._attention(layer, rms_norm(x, self._layer(layer, "attn_norm.scale"), eps),
                              positions, mask,
                              None if kv is None else (lambda k, v, n=layer: kv(n, k, v)))
      h = rms_norm(x, self._layer(layer, "mlp_norm.scale"), eps)
      x = x + (self._moe(layer, h, is_image) if self._is_moe(layer) else self._dense_mlp(layer, h))
    return rms_norm(x, self.p("final_norm.scale"), eps)

  def head(self, x):
    head = self.p("embed_VxD").T if self.m["tie_embeddings"] else self.p("head_DxV")
    return x @ head

  def _dense_mlp(self, i, x):
    w = lambda n: self._layer(i, f"mlp.{n}")
    return swiglu(x, w("w_gate_DxF"), w("w_up_DxF"), w("w_down_FxD"))
