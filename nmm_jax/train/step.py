"""Pure step functions: the model is merged from its graphdef inside, nothing outside is mutated."""
import jax
import optax
from flax import nnx

from nmm_jax.train.loss import loss_sums, token_nll


def _forward_sums(graphdef, params, batch, num_sources):
  model = nnx.merge(graphdef, params)
  nll_BxL = token_nll(model(batch), model.head_weight_DxV(), batch["targets"])
  return loss_sums(nll_BxL, batch, num_sources)


def make_train_step(graphdef, tx, schedule, num_sources):
  def train_step(state, batch):
    def loss_fn(params):
      sums = _forward_sums(graphdef, params, batch, num_sources)
      return sums["nll"] / jax.numpy.maximum(sums["count"], 1.0), sums

    (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state["step"]), "sums": sums}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics
  return train_step


def make_eval_step(graphdef, num_sources):
  def eval_step(params, batch):
    return _forward_sums(graphdef, params, batch, num_sources)
  return eval_step
