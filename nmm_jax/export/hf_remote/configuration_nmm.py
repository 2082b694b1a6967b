"""The configuration of an nmm_jax model exported with `nmm-export --format=hf-multimodal`.

Shipped in the export folder and named in config.json's auto_map, so transformers loads it with
trust_remote_code=True; it needs transformers only (no nmm_jax).
"""
from transformers import PreTrainedConfig


class NMMConfig(PreTrainedConfig):
  """`nmm_model`: nmm_jax's model config as a dict (what nmm_torch.NMMTorch reads);
  `param_shapes`: {nmm_jax parameter name: shape}, so the model is built before its weights are
  read; `image_size`: the run's data.image_size. The other fields are transformers' usual names
  for the decoder's sizes (the cache and generate() read them)."""
  model_type = "nmm_jax"

  nmm_model: dict | None = None
  param_shapes: dict | None = None
  image_size: int = 0
  vocab_size: int = 0
  hidden_size: int = 0
  num_hidden_layers: int = 0
  num_attention_heads: int = 0
  num_key_value_heads: int = 0
  head_dim: int = 0
  max_position_embeddings: int = 0
  # Our tied head is read from the embedding inside nmm_torch; transformers has nothing to tie.
  tie_word_embeddings: bool = False
  use_cache: bool = True
  pad_token_id: int | None = None
  bos_token_id: int | None = None
  eos_token_id: int | None = None
