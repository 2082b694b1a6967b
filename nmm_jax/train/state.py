"""The train state (step, params, optimizer state), its shardings, and its sharded creation."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nmm_jax import sharding
from nmm_jax.models import NMM
from nmm_jax.models.variables import flat_variables


def state_shardings(abstract_params, tx, rules, mesh):
  """Shardings of {"step", "params", "opt_state"}: optimizer moments follow their parameter."""
  params_sh = sharding.param_shardings(abstract_params, rules, mesh)
  opt_shape = jax.eval_shape(tx.init, abstract_params)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_shape, params_sh,
                                 transform_non_params=lambda _: sharding.replicated(mesh),
                                 is_leaf=lambda x: isinstance(x, nnx.Variable))
  return {"step": sharding.replicated(mesh), "params": params_sh, "opt_state": opt_sh}


def create_state(model_cfg, tx, seed: int, shardings):
  """Initialises params and optimizer state directly in their shardings (no host copy)."""
  @functools.partial(jax.jit, out_shardings=shardings)
  def init():
    _, params = nnx.split(NMM(model_cfg, rngs=nnx.Rngs(seed)))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
  return init()


def set_params(state, arrays: dict, shardings):
  """`state` with the parameters named in `arrays` (host arrays) replaced, each placed in its
  sharding (every process passes the same arrays). Raises ValueError on a name or shape that
  does not fit."""
  variables = flat_variables(state["params"])
  placements = flat_variables(shardings["params"])
  for name, array in arrays.items():
    if name not in variables:
      raise ValueError(f"parameter {name} is not in the model")
    variable, sharding = variables[name], placements[name].get_value()
    if tuple(array.shape) != tuple(variable.get_value().shape):
      raise ValueError(f"parameter {name}: shape {tuple(array.shape)}, the model's is "
                       f"{tuple(variable.get_value().shape)}")
    dtype = variable.get_value().dtype
    variable.set_value(jax.make_array_from_callback(
        array.shape, sharding, lambda index, a=array: np.asarray(a[index], dtype)))
  return state
