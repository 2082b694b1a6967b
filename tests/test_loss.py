"""The fused LM head + loss equals the plain softmax cross-entropy, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nmm_jax.train.loss import token_nll, weighted_nll


def _plain(hidden, head, targets, weights):
  logits = jnp.einsum("bld,dv->blv", hidden, head)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(nll * weights), nll


@pytest.mark.parametrize("chunk", [4, 16])
def test_fused_equals_plain(chunk):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  hidden = jax.random.normal(k1, (2, 16, 8))
  head = jax.random.normal(k2, (8, 50))
  targets = jax.random.randint(k3, (2, 16), 0, 50)
  weights = jax.random.uniform(k4, (2, 16)) * (jnp.arange(16) % 3 > 0)
  (want, want_nll), want_grads = jax.value_and_grad(_plain, argnums=(0, 1), has_aux=True)(
      hidden, head, targets, weights)
  (got, got_nll), got_grads = jax.value_and_grad(
      lambda h, w: weighted_nll(h, w, targets, weights, chunk), argnums=(0, 1), has_aux=True)(
          hidden, head)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got_nll, want_nll, rtol=1e-5)
  np.testing.assert_allclose(token_nll(hidden, head, targets, chunk), want_nll, rtol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
  # Under a scaled cotangent (e.g. a loss scale) the gradients scale with it.
  scaled = jax.grad(lambda h: 3.0 * weighted_nll(h, head, targets, weights, chunk)[0])(hidden)
  np.testing.assert_allclose(scaled, 3.0 * want_grads[0], rtol=1e-4, atol=1e-6)
