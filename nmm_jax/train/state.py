"""The train state (step, params, optimizer state), its shardings, and its sharded creation."""
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nmm_jax import sharding
from nmm_jax.models import NMM


def abstract_model_state(model_cfg):
  """(graphdef, abstract params) without allocating anything."""
  abstract_model = nnx.eval_shape(lambda: NMM(model_cfg, rngs=nnx.Rngs(0)))
  return nnx.split(abstract_model)


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
