"""A model's variables without the model: its abstract parameter tree, and parameters by name."""
from flax import nnx

from nmm_jax.models.nmm import NMM


def abstract_model_state(model_cfg):
  """(graphdef, abstract params) without allocating anything."""
  abstract_model = nnx.eval_shape(lambda: NMM(model_cfg, rngs=nnx.Rngs(0)))
  return nnx.split(abstract_model)


def flat_variables(params: nnx.State) -> dict:
  """{"decoder.blocks.attn.w_q_DxHxE": variable, ...}: parameters by their path in the model
  (the names checkpoints, exports and imports use)."""
  return {".".join(str(p) for p in path): v for path, v in nnx.to_flat_state(params)}
