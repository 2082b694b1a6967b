"""Flash attention's Triton kernels: in Pallas' interpreter on the CPU, outputs and the gradients
of q, k and v equal the plain masked softmax's (rows and reference from test_flash_attention.py);
the full-tile runs the dk/dv kernel leaves unmasked are full; and the forward + backward compile
for an H100 through the CUDA plugin's compile-only devices without an [L, L] temporary."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_flash_attention import (
  EDGE_DOCS,
  output_and_grads,
  packed_row,
  reference,
  rows_with_long_document,
)

from nmm_jax.models.flash_attention import pad_ranges, padded_length, tile_bounds
from nmm_jax.models.flash_attention_gpu import _full_q_run, flash_attention_gpu
from nmm_jax.models.key_ranges import key_ranges, mask_from_ranges

# (dtype, length, query heads, kv heads, block_q, block_k, rows of batch()): GQA ratios 1, 2, 4;
# lengths that are multiples of the blocks and not (100 pads to 128, 160 to 192).
CASES = [
    (jnp.float32, 128, 2, 2, 32, 32, 3),
    (jnp.float32, 100, 4, 2, 32, 32, 2),
    (jnp.float32, 160, 4, 1, 64, 32, 2),
    (jnp.bfloat16, 128, 4, 2, 32, 32, 2),
]


@pytest.mark.parametrize("dtype,length,heads,kv_heads,block_q,block_k,rows", CASES)
def test_flash_attention_gpu_matches_reference(dtype, length, heads, kv_heads, block_q, block_k,
                                               rows):
  segment_ids, image_ids = rows_with_long_document(length, rows, seed=length + heads)
  rows = segment_ids.shape[0]
  start, limit = key_ranges(segment_ids, image_ids)
  bounds = tile_bounds(*pad_ranges(start, limit, padded_length(length, block_q, block_k)),
                       block_q, block_k)
  assert int(jnp.sum(jnp.maximum(bounds.full_hi - bounds.full_lo, 0))) > 0  # unmasked loops run
  keys = jax.random.split(jax.random.key(length), 4)
  e = 16
  q = jax.random.normal(keys[0], (rows, length, heads, e), dtype)
  k = jax.random.normal(keys[1], (rows, length, kv_heads, e), dtype)
  v = jax.random.normal(keys[2], (rows, length, kv_heads, e), dtype)
  # Padding rows carry no loss: their cotangent is zero, as in training.
  real = (segment_ids > 0)[:, :, None, None]
  d_out = jax.random.normal(keys[3], q.shape, jnp.float32) * real

  kernel = jax.jit(lambda *x: output_and_grads(
      lambda q, k, v: flash_attention_gpu(q, k, v, start, limit, block_q=block_q,
                                          block_k=block_k, interpret=True), *x))
  plain = jax.jit(lambda *x: output_and_grads(
      lambda q, k, v: reference(q, k, v, segment_ids, image_ids), *x))
  got = kernel(q, k, v, d_out)
  want = plain(q, k, v, d_out)
  assert [x.dtype for x in got] == [dtype] * 4
  assert [x.shape for x in got] == [q.shape, q.shape, k.shape, k.shape]
  # Empty-range rows are exactly zero (the reference spreads them over all keys).
  np.testing.assert_array_equal(jnp.where(real, 0, got[0].astype(jnp.float32)), 0)
  got = (jnp.where(real, got[0], 0), *got[1:])
  want = (jnp.where(real, want[0], 0), *want[1:])
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    g = np.asarray(g.astype(jnp.float32))
    w = np.asarray(w)
    scale = np.max(np.abs(w))
    assert scale > 0.1, name
    assert np.max(np.abs(g - w)) < tolerance * scale, name


def test_full_q_runs_are_full():
  """Every tile of a k block's run is full (all its pairs allowed), and on packed rows the run
  holds all of the k block's full tiles, so the dk/dv kernel masks only where it must."""
  length, block_q, block_k = 256, 32, 64
  rng = np.random.default_rng(2)
  rows = [packed_row(rng, length, EDGE_DOCS, padding=int(rng.integers(0, 90))) for _ in range(6)]
  # A long image: tiles inside it are full in both directions.
  rows.append(packed_row(rng, length, [(200, [(10, 150)])], padding=20))
  segment_ids, image_ids = (jnp.asarray(np.stack(x)) for x in zip(*rows))
  start, limit = key_ranges(segment_ids, image_ids)
  assert padded_length(length, block_q, block_k) == length
  bounds = tile_bounds(start, limit, block_q, block_k)
  lo, hi = (np.asarray(x) for x in _full_q_run(bounds.full_lo, bounds.full_hi,
                                               length // block_k))
  mask = np.asarray(mask_from_ranges(start, limit))[:, 0]
  b, n, m = len(rows), length // block_q, length // block_k
  full = mask.reshape(b, n, block_q, m, block_k).all(axis=(2, 4))
  q_block = np.arange(n)[None, :, None]
  in_run = (lo[:, None, :] <= q_block) & (q_block < hi[:, None, :])
  np.testing.assert_array_equal(in_run, full)
  assert full.sum() > m  # the case exercises unmasked tiles


def test_compiles_for_h100_without_scores():
  """H100, bf16, L 2048, 8 query heads over 2 kv heads of 128, blocks of 64: Triton accepts the
  forward and both backward kernels, and the step's temporaries are far below the 128 MiB of
  materialised f32 scores."""
  pytest.importorskip("jax_cuda12_plugin")
  from nmm_jax.compile import topologies
  device = topologies.target("h100-8").devices[0]
  b, l, h, kv, e = 1, 2048, 8, 2, 128
  place = jax.sharding.SingleDeviceSharding(device)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=place)
  args = (spec((b, l, h, e), jnp.bfloat16), spec((b, l, kv, e), jnp.bfloat16),
          spec((b, l, kv, e), jnp.bfloat16), spec((b, l), jnp.int32), spec((b, l), jnp.int32))

  def step(q, k, v, start, limit):
    loss = lambda q, k, v: jnp.sum(flash_attention_gpu(q, k, v, start, limit, block_q=64,
                                                       block_k=64).astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  lowered = jax.jit(step).lower(*args)
  assert lowered.as_text().count("__gpu$xla.gpu.triton") == 3
  with topologies.quiet_stderr():
    compiled = lowered.compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  scores = l * l * h * 4
  assert 0 < temp < scores / 16, temp
