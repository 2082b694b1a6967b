"""The learning-rate schedules and what weight decay touches."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from conftest import tiny_config
from nmm_jax.train.optimizer import _decay_mask, learning_rate_schedule, make_optimizer


def test_inverse_sqrt_schedule_shape():
  t = tiny_config(**{"train.steps": 100, "train.warmup_steps": 10, "train.lr": 1.0}).train
  lr = np.array([float(learning_rate_schedule(t)(s)) for s in range(100)])
  np.testing.assert_allclose(lr[:10], np.arange(1, 11) / 10, rtol=1e-6)  # linear warmup
  np.testing.assert_allclose(lr[10:80], 1.0)                              # constant
  cooldown = lr[80:]                                                      # last 20 %
  np.testing.assert_allclose(cooldown, 1 - np.sqrt(np.arange(20) / 20), rtol=1e-6)
  assert (np.diff(cooldown) < 0).all()


def test_cosine_schedule():
  t = tiny_config(**{"train.steps": 100, "train.warmup_steps": 10, "train.lr": 1.0,
                     "train.schedule": "cosine"}).train
  lr = learning_rate_schedule(t)
  assert float(lr(10)) == 1.0
  np.testing.assert_allclose(float(lr(55)), 0.5, atol=1e-6)
  np.testing.assert_allclose(float(lr(100)), 0.0, atol=1e-6)


def test_weight_decay_skips_norm_scales_and_clip_applies():
  params = {"layer": {"w": jnp.ones((4, 4)), "norm": {"scale": jnp.ones((4,))}}}
  mask = _decay_mask(params)
  assert mask["layer"]["w"] and not mask["layer"]["norm"]["scale"]
  t = tiny_config(**{"train.weight_decay": 0.5, "train.lr": 0.1, "train.warmup_steps": 0}).train
  tx = make_optimizer(t)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["layer"]["w"], 1 - 0.1 * 0.5)  # decoupled decay only
  np.testing.assert_allclose(new["layer"]["norm"]["scale"], 1.0)
  huge = jax.tree.map(lambda p: jnp.full_like(p, 1e6), params)
  clipped, _ = optax.clip_by_global_norm(t.clip_norm).update(huge, None)
  np.testing.assert_allclose(float(optax.tree.norm(clipped)), t.clip_norm, rtol=1e-5)
