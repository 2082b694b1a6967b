"""AdamW and the learning-rate schedules (warmup -> constant -> cooldown, or cosine)."""
import jax
import jax.numpy as jnp
import optax


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
  """Weight decay on matrices only: norm scales are left alone."""
  def decays(path, _):
    return not any(getattr(k, "key", None) == "scale" for k in path)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(t) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(t.clip_norm),
      optax.adamw(learning_rate_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                  mask=_decay_mask),
  )
