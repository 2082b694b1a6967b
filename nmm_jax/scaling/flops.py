"""Parameter and FLOP accounting: the one place model sizes and compute are counted.

Training compute C = 6 * N * D: N = parameters taking part in matmuls (the embedding lookup is not
a matmul; the LM head is), D = tokens they process. Early fusion: every sequence position passes
the decoder, image patches included. Late fusion adds 6 * N_v * D_v: N_v = the encoder, connector
and fusion modules' per-patch matmuls, D_v = image slots * patches (the encoder runs on every
slot of a row, empty ones too). Attention adds 6 * layers * S^2 * (heads * head_dim) per decoder
sequence (causal: half of full cost, MaxText's count), 12 * P^2 * width per encoder layer and
image, and 12 * S * I*P * d_model per cross-attention block.
"""
from nmm_jax.config import vision_head_dim, vision_layer_plan


def _decoder_mlp_params(m) -> tuple:
  """(all, active per token) parameters of the decoder's MLPs: an MoE holds num_experts
  SwiGLUs and a router (and with moe.balance="bias" a selection bias per expert), a token
  passes top_k of them and the shared experts (num_shared_experts SwiGLUs' worth, always on);
  after moe.first_dense_layers dense layers, one layer in moe.every is MoE, the others dense."""
  swiglu = 3 * m.d_model * m.mlp_dim
  if not m.moe.num_experts:
    return m.num_layers * swiglu, m.num_layers * swiglu
  router = m.d_model * m.moe.num_experts
  bias = m.moe.num_experts if m.moe.balance == "bias" else 0
  shared = m.moe.num_shared_experts * swiglu
  moe_layers = (m.num_layers - m.moe.first_dense_layers) // m.moe.every
  dense = (m.num_layers - moe_layers) * swiglu
  return (dense + moe_layers * (m.moe.num_experts * swiglu + shared + router + bias),
          dense + moe_layers * (m.moe.top_k * swiglu + shared + router))


def decoder_params(m) -> int:
  """All parameters of the decoder's blocks."""
  attn = m.d_model * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
  norms = 2 * m.d_model + (2 * m.head_dim if m.qk_norm else 0)
  return m.num_layers * (attn + norms) + _decoder_mlp_params(m)[0]


def _patch_dim(m) -> int:
  return m.patch_size * m.patch_size * m.num_channels


def vision_param_counts(m) -> dict:
  """Late fusion's encoder + connector + fusion blocks: {"total", "matmul" (per patch),
  "decoder_matmul" (per sequence token: the cross-attention queries and outputs)}."""
  v, d = m.vision, m.d_model
  w, f, j = v.d_model, v.mlp_dim, v.num_layers
  attention = v.num_heads * vision_head_dim(v)
  encoder_matmul = _patch_dim(m) * w + j * (4 * w * attention + 2 * w * f)
  encoder_total = encoder_matmul + v.num_patches * w + 2 * w + j * 4 * w
  input_layers, injected = vision_layer_plan(m)
  inputs, blocks = len(input_layers), len(injected)
  connector = inputs * w * d + d * d
  matmul, total, decoder_matmul = encoder_matmul + connector, encoder_total + connector, 0
  if m.vision_fusion == "internal_add":
    matmul += blocks * (w * d + d * d)
    total += blocks * (w * d + d * d)
  elif m.vision_fusion == "internal_xattn":
    matmul += blocks * 2 * w * d
    decoder_matmul = blocks * 2 * d * d
    total += blocks * (2 * d + 2 * d * d + 2 * w * d + 1)
  return {"total": total, "matmul": matmul, "decoder_matmul": decoder_matmul}


def param_counts(m) -> dict:
  """{"total", "matmul", "vision_matmul"}: all parameters; the matmul parameters every sequence
  token passes (N; for MoE the active ones: top_k experts and the router); those every image
  patch slot passes (N_v, late fusion)."""
  embed = m.vocab_size * m.d_model
  head = 0 if m.tie_embeddings else m.d_model * m.vocab_size
  layers = decoder_params(m)
  matmul = (m.num_layers * m.d_model * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
            + _decoder_mlp_params(m)[1] + m.d_model * m.vocab_size)
  total = embed + head + layers + m.d_model
  if m.fusion == "early":
    patch = _patch_dim(m) * m.d_model
    return {"total": total + patch, "matmul": matmul + patch, "vision_matmul": 0}
  vision = vision_param_counts(m)
  return {"total": total + vision["total"], "matmul": matmul + vision["decoder_matmul"],
          "vision_matmul": vision["matmul"]}


def train_flops_per_sequence(m, seq_len: int, images_per_row: int = 0) -> float:
  """Model FLOPs of one training step (forward + backward) on one sequence; `images_per_row`
  (data.max_images) counts late fusion's encoder work."""
  counts = param_counts(m)
  flops = 6.0 * counts["matmul"] * seq_len
  flops += 6.0 * m.num_layers * seq_len ** 2 * m.num_heads * m.head_dim
  if m.fusion == "late" and images_per_row:
    p = m.vision.num_patches
    flops += 6.0 * counts["vision_matmul"] * images_per_row * p
    flops += (12.0 * m.vision.num_layers * p ** 2 * m.vision.num_heads
              * vision_head_dim(m.vision) * images_per_row)
    if m.vision_fusion == "internal_xattn":
      blocks = len(vision_layer_plan(m)[1])
      flops += 12.0 * blocks * seq_len * images_per_row * p * m.d_model
  return flops
