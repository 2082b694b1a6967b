"""The fused LM head + loss equals the plain softmax cross-entropy, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nmm_jax.models.lm_head import token_nll
from nmm_jax.train.loss import weighted_nll


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


def _plain_bf16(hidden, head, targets, weights):
  """The plain loss as a bf16 model computes it: bf16 operands, f32 logits and softmax."""
  logits = jnp.einsum("bld,dv->blv", hidden, head.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(nll * weights), nll


def test_fused_in_bfloat16_equals_plain_bfloat16():
  """bf16 hidden states and an f32 head (the bf16 train step's inputs): the fused loss's value
  and gradients match autodiff of the plain bf16 computation, in each primal's dtype."""
  k1, k2, k3, k4 = jax.random.split(jax.random.key(1), 4)
  hidden = jax.random.normal(k1, (2, 32, 64)).astype(jnp.bfloat16)
  head = jax.random.normal(k2, (64, 300)) * 0.1
  targets = jax.random.randint(k3, (2, 32), 0, 300)
  weights = jax.random.uniform(k4, (2, 32)) / 64
  (want, want_nll), want_grads = jax.value_and_grad(_plain_bf16, argnums=(0, 1), has_aux=True)(
      hidden, head, targets, weights)
  (got, got_nll), got_grads = jax.jit(jax.value_and_grad(
      lambda h, w: weighted_nll(h, w, targets, weights, 8), argnums=(0, 1), has_aux=True))(
          hidden, head)
  assert got_nll.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got_nll, want_nll, rtol=1e-5, atol=1e-5)
  assert got_grads[0].dtype == jnp.bfloat16 and got_grads[1].dtype == jnp.float32
  for g, w in zip(got_grads, want_grads):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    # bf16 keeps 8 bits of mantissa: errors of a few parts in 1000 of the gradient's scale.
    np.testing.assert_allclose(g, w, atol=1e-2 * np.abs(w).max())
    assert np.corrcoef(g.ravel(), w.ravel())[0, 1] > 0.9999
