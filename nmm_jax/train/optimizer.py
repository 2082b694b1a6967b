"""AdamW and the learning-rate schedules (warmup -> constant -> cooldown, or cosine)."""
import jax
import jax.numpy as jnp
import optax

from nmm_jax.models.moe import is_router_bias


def learning_rate_schedule(t) -> optax.Schedule:
  """Linear warmup, then either

  * "inverse_sqrt" (the paper's): constant, then over the last `cooldown_fraction` of training
    lr * (1 - sqrt(progress)), which reaches 0 at the last step; or
  * "cosine": cosine decay to 0 after warmup.
  """
  if t.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, t.lr, t.warmup_steps, t.steps, end_value=0.0)
  cooldown_steps = int(round(t.steps * t.cooldown_fraction))
  cooldown_start = t.steps - cooldown_steps

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warmup = jnp.minimum(1.0, (step + 1) / max(t.warmup_steps, 1))
    progress = jnp.clip((step - cooldown_start) / max(cooldown_steps, 1), 0.0, 1.0)
    return t.lr * warmup * (1.0 - jnp.sqrt(progress))
  return schedule


def _decay_mask(params):
  """Weight decay on matrices only: norm scales and biases are left alone."""
  def decays(path, _):
    return not any(getattr(k, "key", None) in ("scale", "bias") for k in path)
  return jax.tree_util.tree_map_with_path(decays, params)


def _vision_mask(params):
  """True for the late-fusion encoder's parameters (models/vision.py: `NMM.vision`)."""
  def in_vision(path, _):
    return bool(path) and getattr(path[0], "key", None) == "vision"
  return jax.tree_util.tree_map_with_path(in_vision, params)


def _router_bias_mask(params):
  """True for the MoE selection biases (models/moe.py RouterBias): the train step sets them."""
  return jax.tree_util.tree_map_with_path(lambda path, _: is_router_bias(path), params)


def make_optimizer(t, model=None) -> optax.GradientTransformation:
  """AdamW with global-norm clipping. Late fusion (`model.fusion="late"`): the encoder's updates
  are scaled by `model.vision.lr_scale`, or zeroed when `model.vision.freeze` (its weight decay
  too, since it is part of the update). MoE balance="bias": the selection biases get no
  update here (train/step.py moves them by the expert loads)."""
  parts = [
      optax.clip_by_global_norm(t.clip_norm),
      optax.adamw(learning_rate_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                  mask=_decay_mask),
  ]
  if model is not None and model.fusion == "late":
    scale = 0.0 if model.vision.freeze else float(model.vision.lr_scale)
    if scale != 1.0:
      parts.append(optax.masked(optax.scale(scale), _vision_mask))
  if model is not None and model.moe.num_experts and model.moe.balance == "bias":
    parts.append(optax.masked(optax.set_to_zero(), _router_bias_mask))
  return optax.chain(*parts)
