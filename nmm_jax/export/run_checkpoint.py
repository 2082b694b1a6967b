"""A run's checkpoint read for export: its saved config and only its parameters, on the host.

The optimizer state is left on disk (Orbax partial restore), so exporting needs the memory of
one copy of the parameters, whatever the mesh the run trained on.
"""
import dataclasses
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from nmm_jax import config as config_lib
from nmm_jax.checkpoint import Checkpointer
from nmm_jax.data.shards import run_data_folder, tokenizer_in
from nmm_jax.models.variables import abstract_model_state, flat_variables


@dataclasses.dataclass
class RunCheckpoint:
  workdir: str
  step: int
  config: ml_collections.ConfigDict
  tokenizer_path: str  # '' when the run's tokenizer file cannot be found

  def params(self) -> nnx.State:
    """The parameters, as arrays on the CPU (the optimizer state stays on disk)."""
    _, abstract = abstract_model_state(self.config.model)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    item = {"params": jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=cpu), abstract)}
    checkpointer = Checkpointer(self.workdir, keep=1, async_save=False)
    try:
      restored = checkpointer.manager.restore(self.step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
              partial_restore=True)))
    finally:
      checkpointer.close()
    return restored.state["params"]


def open_run(workdir: str, step: int | None = None) -> RunCheckpoint:
  """The checkpoint at `step` (default: the latest) of a run, with its saved config."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(f"{workdir} has no checkpoints/ folder: not a training run's workdir")
  checkpointer = Checkpointer(workdir, keep=1, async_save=False)
  try:
    steps = checkpointer.manager.all_steps()
    if not steps:
      raise FileNotFoundError(f"{workdir}/checkpoints holds no finished checkpoint")
    step = max(steps) if step is None else step
    if step not in steps:
      raise ValueError(f"{workdir} has no checkpoint at step {step}; it has {sorted(steps)}")
    config = config_lib.from_saved(checkpointer.saved_config(step))
  finally:
    checkpointer.close()
  return RunCheckpoint(workdir, step, config, _tokenizer_path(config, workdir))


def _tokenizer_path(config, workdir: str) -> str:
  if config.data.tokenizer:
    return config.data.tokenizer if os.path.isfile(config.data.tokenizer) else ""
  return tokenizer_in(run_data_folder(config, workdir))


def flat_params(params: nnx.State) -> dict:
  """{"decoder.blocks.attn.w_q_DxHxE": array, ...}: the names the exports use."""
  return {name: v.get_value() for name, v in flat_variables(params).items()}
