"""Pure step functions: the model is merged from its graphdef inside, nothing outside is mutated."""
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nmm_jax.models.lm_head import token_nll
from nmm_jax.models.moe import is_router_bias, update_router_bias
from nmm_jax.models.nmm import real_tokens_BxL
from nmm_jax.train.loss import loss_sums, weighted_nll


def moe_aux_loss(stats, moe, real_tokens, microbatches: int = 1):
  """The weighted MoE auxiliary losses, averaged over layers (0 for dense models). With
  moe.balance="bias" the bias balances the load and the balance loss is left out. The router
  z-loss is a mean over the whole batch's `real_tokens`, so microbatches sum to it exactly; the
  balance loss multiplies two means over the tokens a layer sees, so `microbatches` of them
  are averaged (Switch and Megatron do the same)."""
  if not stats:
    return 0.0
  balance = 0.0 if moe.balance == "bias" else moe.load_balance_weight
  return (balance * jnp.mean(stats["load_balance"]) / microbatches
          + moe.z_loss_weight * jnp.mean(stats["z_loss_sum"]) / real_tokens)


def with_router_bias_updated(params, stats, moe):
  """moe.balance="bias": each MoE layer's selection bias moved by this step's expert loads (its
  real tokens' assignments, summed over microbatches). The MoE layers' statistics and biases
  are stacked alike, one per layer on the leading axis."""
  if moe is None or moe.balance != "bias" or not stats:
    return params
  load_UxX = stats["image_per_expert"] + stats["text_per_expert"]
  return jax.tree_util.tree_map_with_path(
      lambda path, p: (update_router_bias(p, load_UxX, moe.bias_update_rate, moe.routing)
                       if is_router_bias(path) else p), params)


def in_compute_dtype(params, dtype):
  """Floating-point parameters cast to the compute dtype where they are stored, i.e. still
  sharded: FSDP's per-layer all-gathers then move bf16, half the bytes of the f32 master copy.
  The gradient flows back through the cast to the f32 parameters."""
  dtype = jnp.dtype(dtype)
  # The MoE selection bias stays f32: its steps (moe.bias_update_rate) are below bf16's
  # resolution near its values.
  return jax.tree_util.tree_map_with_path(
      lambda path, p: (p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating)
                       and not is_router_bias(path) else p), params)


def split_microbatches(batch, k: int):
  """[B, ...] arrays -> [k, B/k, ...]: microbatch j holds rows j, k + j, 2k + j, ..., so each
  spreads over every device like the batch (a device's rows are contiguous) and splitting it
  moves nothing."""
  return jax.tree.map(lambda a: jnp.swapaxes(a.reshape(a.shape[0] // k, k, *a.shape[1:]), 0, 1),
                      batch)


def join_microbatches(x_KxBk):
  """The inverse of split_microbatches for one [k, B/k, ...] array."""
  k, rows = x_KxBk.shape[:2]
  return jnp.swapaxes(x_KxBk, 0, 1).reshape(k * rows, *x_KxBk.shape[2:])


# MoE statistics that are means over the batch (the rest are counts, summed over microbatches).
_MEAN_STATS = ("load_balance",)


def make_train_step(graphdef, tx, schedule, num_sources, loss_chunk, moe=None,
                    compute_dtype="float32", microbatches: int = 1):
  """`moe`: model.moe, for the weights of the auxiliary losses; `compute_dtype`: model.dtype;
  `microbatches` (train.microbatches): the batch is run as that many microbatches in a scan,
  gradients summed in f32, one optimizer update (the same update: the loss is normalised by
  the whole batch's token count)."""
  def train_step(state, batch):
    count = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    # The tokens the MoE layers route, over the whole batch (the z-loss's denominator).
    real_tokens = jnp.maximum(jnp.sum(real_tokens_BxL(batch)), 1).astype(jnp.float32)

    def loss_fn(params, part):
      model = nnx.merge(graphdef, in_compute_dtype(params, compute_dtype))
      hidden_BxLxD, moe_stats = model.forward(part)
      loss, nll_BxL = weighted_nll(hidden_BxLxD, model.head_weight_DxV(), part["targets"],
                                   part["loss_mask"] / count, loss_chunk)
      aux = moe_aux_loss(moe_stats, moe, real_tokens, microbatches) if moe is not None else 0.0
      return loss + aux, (loss, nll_BxL, moe_stats)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatches == 1:
      (_, (loss, nll_BxL, moe_stats)), grads = grad_fn(state["params"], batch)
    else:
      def accumulate(grads, part):
        (_, outputs), part_grads = grad_fn(state["params"], part)
        return jax.tree.map(lambda g, p: g + p.astype(jnp.float32), grads, part_grads), outputs

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state["params"])
      grads, (losses, nll_KxBkxL, stats) = jax.lax.scan(
          accumulate, zeros, split_microbatches(batch, microbatches))
      grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state["params"])
      loss, nll_BxL = jnp.sum(losses), join_microbatches(nll_KxBkxL)
      moe_stats = {k: (jnp.mean(v, axis=0) if k in _MEAN_STATS else jnp.sum(v, axis=0))
                   for k, v in stats.items()}
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = with_router_bias_updated(optax.apply_updates(state["params"], updates), moe_stats,
                                      moe)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]),
               "sums": loss_sums(nll_BxL, batch, num_sources)}
    if moe_stats:
      metrics["moe"] = moe_stats
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics
  return train_step


def make_eval_step(graphdef, num_sources, loss_chunk):
  def eval_step(params, batch):
    model = nnx.merge(graphdef, params)
    nll_BxL = token_nll(model(batch), model.head_weight_DxV(), batch["targets"], loss_chunk)
    return loss_sums(nll_BxL, batch, num_sources)
  return eval_step
