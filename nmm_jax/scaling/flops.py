"""Parameter and FLOP accounting: the one place model sizes and compute are counted.

Training compute C = 6 * N * D (early fusion), N = parameters taking part in matmuls (the
embedding lookup is not a matmul; the LM head is), plus causal attention at half of its full
cost: 6 * layers * S^2 * (heads * head_dim) per sequence of length S (MaxText's count).
"""


def decoder_layer_params(m) -> int:
  attn = m.d_model * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
  mlp = 3 * m.d_model * m.mlp_dim
  norms = 2 * m.d_model + (2 * m.head_dim if m.qk_norm else 0)
  return attn + mlp + norms


def param_counts(m) -> dict:
  """{"total", "matmul"} parameter counts of an early-fusion model config."""
  embed = m.vocab_size * m.d_model
  head = 0 if m.tie_embeddings else m.d_model * m.vocab_size
  patch = m.patch_size * m.patch_size * m.num_channels * m.d_model
  layers = m.num_layers * decoder_layer_params(m)
  total = embed + head + patch + layers + m.d_model
  matmul = m.num_layers * m.d_model * (m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
                                       + 3 * m.mlp_dim) + m.d_model * m.vocab_size + patch
  return {"total": total, "matmul": matmul}


def train_flops_per_sequence(m, seq_len: int) -> float:
  """Model FLOPs of one training step (forward + backward) on one sequence."""
  dense = 6.0 * param_counts(m)["matmul"] * seq_len
  attention = 6.0 * m.num_layers * seq_len ** 2 * m.num_heads * m.head_dim
  return dense + attention
