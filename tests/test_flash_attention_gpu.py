"""Flash attention's Triton kernels: in Pallas' interpreter on the CPU, outputs and the gradients
of q, k and v equal the plain masked softmax's (rows and reference from test_flash_attention.py);
the full-tile runs the dk/dv kernel leaves unmasked are full; and the forward + backward compile
for an H100 through the CUDA plugin's compile-only devices without an [L, L] temporary."""
import functools

import jax.numpy as jnp
import numpy as np
import pytest
from test_flash_attention import (
  EDGE_DOCS,
  assert_matches_reference,
  assert_no_scores,
  lowered_forward_backward,
  packed_row,
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
  start, limit = key_ranges(*rows_with_long_document(length, rows, seed=length + heads))
  bounds = tile_bounds(*pad_ranges(start, limit, padded_length(length, block_q, block_k)),
                       block_q, block_k)
  assert int(jnp.sum(jnp.maximum(bounds.full_hi - bounds.full_lo, 0))) > 0  # unmasked loops run
  attention = functools.partial(flash_attention_gpu, block_q=block_q, block_k=block_k,
                                interpret=True)
  assert_matches_reference(attention, dtype, length, heads, kv_heads, rows)


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
  """H100, blocks of 64: Triton accepts the forward and both backward kernels, and the step's
  temporaries are far below the 128 MiB of materialised f32 scores."""
  pytest.importorskip("jax_cuda12_plugin")
  from nmm_jax.compile import topologies
  attention = functools.partial(flash_attention_gpu, block_q=64, block_k=64)
  lowered = lowered_forward_backward(attention, topologies.target("h100-8").devices[0])
  assert lowered.as_text().count("__gpu$xla.gpu.triton") == 3
  with topologies.quiet_stderr():
    compiled = lowered.compile()
  assert_no_scores(compiled)
