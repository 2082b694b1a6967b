"""The jitted train and eval steps of a config over a mesh, with their shardings.

One builder for everything that runs or compiles the train step: the training loop, nmm-bench and
nmm-compile (which lowers it for accelerators that are not attached). What the loop runs is
therefore exactly what the compile reports describe: same state and batch shardings, donation,
remat and compute dtype.
"""
import dataclasses

import jax
import numpy as np
import optax

from nmm_jax import config as config_lib
from nmm_jax import sharding
from nmm_jax.data import batch as batch_lib
from nmm_jax.models import attention_kernels
from nmm_jax.models.variables import abstract_model_state
from nmm_jax.train import optimizer as optimizer_lib
from nmm_jax.train import state as state_lib
from nmm_jax.train.step import make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class TrainProgram:
  mesh: jax.sharding.Mesh
  graphdef: object
  abstract_params: object
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: dict
  batch_shardings: dict
  train_step: object   # (state, batch) -> (state, metrics), state donated
  eval_step: object    # (params, batch) -> loss sums

  def abstract_state(self):
    """The train state as ShapeDtypeStructs in their shardings (nothing allocated)."""
    shapes = {"step": jax.ShapeDtypeStruct((), np.int32), "params": self.abstract_params,
              "opt_state": jax.eval_shape(self.tx.init, self.abstract_params)}
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, self.state_shardings)

  def create_state(self, config):
    return state_lib.create_state(config.model, self.tx, config.train.seed, self.state_shardings)


def batch_shapes(config, batch_size: int, keys=tuple(batch_lib.FIELDS)) -> dict:
  """{key: (shape, dtype)} of a global batch of `batch_size` rows in the batch contract."""
  d = config.data
  return batch_lib.shapes(batch_size, d.seq_len, d.max_images, d.image_size, d.image_size,
                          config.model.num_channels, keys=keys)


def build(config, mesh, num_sources: int, batch_ndims=None) -> TrainProgram:
  """The steps of `config` over `mesh`. `batch_ndims`: the batch's keys and ranks (default: the
  whole batch contract; text-only benchmark batches have no images)."""
  batch_ndims = batch_lib.ndims() if batch_ndims is None else batch_ndims
  rules = config_lib.sharding_rules(config)
  tx = optimizer_lib.make_optimizer(config.train, config.model)
  schedule = optimizer_lib.learning_rate_schedule(config.train)
  # model.attention="auto" means what it does on the mesh's chips (nmm-compile's TPU and H100
  # targets are not JAX's default backend here).
  platform = mesh.devices.flat[0].platform
  model_cfg = attention_kernels.resolved(config.model, platform)
  if model_cfg.attention == "cudnn" and platform not in ("gpu", "cuda"):
    raise config_lib.ConfigError(f"config.model.attention: 'cudnn' runs on NVIDIA GPUs only, "
                                 f"not on {platform}")
  graphdef, abstract_params = abstract_model_state(model_cfg)
  state_sh = state_lib.state_shardings(abstract_params, tx, rules, mesh)
  batch_sh = sharding.batch_shardings(batch_ndims, mesh, rules)
  train_step = jax.jit(
      make_train_step(graphdef, tx, schedule, num_sources, config.train.loss_chunk,
                      config.model.moe, config.model.dtype, config.train.microbatches),
      in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharding.replicated(mesh)),
      donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(graphdef, num_sources, config.train.loss_chunk),
                      in_shardings=(state_sh["params"], batch_sh),
                      out_shardings=sharding.replicated(mesh))
  return TrainProgram(mesh=mesh, graphdef=graphdef, abstract_params=abstract_params, tx=tx,
                      schedule=schedule, state_shardings=state_sh, batch_shardings=batch_sh,
                      train_step=sharding.traced_under(mesh, train_step, rules),
                      eval_step=sharding.traced_under(mesh, eval_step, rules))


def abstract_batch(program: TrainProgram, config, batch_size: int) -> dict:
  """A global batch of `batch_size` rows as ShapeDtypeStructs in the program's shardings."""
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=program.batch_shardings[k])
          for k, (shape, dtype) in batch_shapes(config, batch_size,
                                                tuple(program.batch_shardings)).items()}


def lower_train_step(program: TrainProgram, config, batch_size: int):
  """The train step lowered for a global batch of `batch_size` rows, from shapes only."""
  return program.train_step.lower(program.abstract_state(),
                                  abstract_batch(program, config, batch_size))
