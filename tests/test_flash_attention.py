"""Flash attention over per-query key ranges: key_ranges == attention_mask on packed rows; the
Pallas kernels (TPU interpret mode on the CPU) == the plain masked softmax in outputs and in the
gradients of q, k and v; tile skipping visits exactly the tiles that hold an allowed key; and the
forward + backward compile for a v5p chip through libtpu's compile-only devices without an
[L, L] temporary."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from nmm_jax.models.attention import attention_mask
from nmm_jax.models.flash_attention import flash_attention, visited_tiles
from nmm_jax.models.key_ranges import key_ranges, mask_from_ranges

# The TPU interpreter: scratch starts as NaN and out-of-bounds reads raise, so a kernel that reads
# memory it did not initialise or fetch fails here rather than on a TPU.
INTERPRET = pltpu.InterpretParams()


def packed_row(rng, length, docs=None, padding=0):
  """(segment_ids, image_ids) of one packed row. `docs`: (length, [(offset, size), ...]) per
  document; random documents fill the rest of the row up to `padding` trailing positions."""
  segment_ids = np.zeros(length, np.int32)
  image_ids = np.full(length, -1, np.int32)
  docs = list(docs or [])
  at = sum(n for n, _ in docs)
  while at < length - padding:
    n = int(min(rng.integers(1, 40), length - padding - at))
    images, offset = [], 0
    while offset < n and rng.random() < 0.6:
      offset += int(rng.integers(0, 6))  # 0: an image right at the document start or after one
      size = int(rng.integers(1, 9))
      if offset + size <= n:
        images.append((offset, size))
      offset += size
    docs.append((n, images))
    at += n
  at, image = 0, 0
  for doc, (n, images) in enumerate(docs):
    segment_ids[at:at + n] = doc + 1
    for offset, size in images:
      image_ids[at + offset:at + offset + size] = image
      image += 1
    at += n
  return segment_ids, image_ids


# A document opening with an image, one whose image crosses the 32-position tile boundary
# (28..37), one ending with an image: every kernel case starts its first row with these.
EDGE_DOCS = [(24, [(0, 6), (10, 3)]), (40, [(4, 10)]), (30, [(22, 8)])]


def batch(length, rows, seed):
  """[rows, length] ids: the edge documents then random ones; row 1 mostly padding (whole q and
  k blocks empty); row 2, if any, all padding."""
  rng = np.random.default_rng(seed)
  made = [packed_row(rng, length, EDGE_DOCS, padding=length % 7)]
  made.append(packed_row(rng, length, [(length // 3, [(3, 5)])], padding=length - length // 3))
  made += [packed_row(rng, length, padding=length)] * (rows - 2)
  return tuple(jnp.asarray(np.stack(x)) for x in zip(*made))


def rows_with_long_document(length, rows, seed):
  """batch()'s rows (edge documents, mostly padding, all padding), then one document filling the
  row: text, an image of a third of the row, text. Its tiles below the diagonal lie in every
  row's range: the kernels compute those without the mask."""
  segment_ids, image_ids = batch(length, rows, seed)
  rng = np.random.default_rng(seed)
  long_row = packed_row(rng, length, [(length, [(length // 3, length // 3)])])
  return (jnp.concatenate([segment_ids, jnp.asarray(long_row[0])[None]]),
          jnp.concatenate([image_ids, jnp.asarray(long_row[1])[None]]))


def test_key_ranges_equal_attention_mask():
  rng = np.random.default_rng(0)
  rows = [packed_row(rng, 96, padding=int(rng.integers(0, 20))) for _ in range(24)]
  rows.append(packed_row(rng, 96, EDGE_DOCS))
  # An image in the row's first and last positions, a one-position document, adjacent images.
  rows.append(packed_row(rng, 96, [(1, [(0, 1)]), (20, [(0, 4), (4, 4), (8, 2)]),
                                   (75, [(60, 15)])]))
  segment_ids, image_ids = (jnp.asarray(np.stack(x)) for x in zip(*rows))
  start, limit = key_ranges(segment_ids, image_ids)
  assert start.dtype == limit.dtype == jnp.int32
  np.testing.assert_array_equal(mask_from_ranges(start, limit),
                                attention_mask(segment_ids, image_ids))


def reference(q, k, v, segment_ids, image_ids):
  """The plain attention in f32: attention_mask, softmax, GQA by repeating k and v."""
  groups = q.shape[2] // k.shape[2]
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  logits = jnp.einsum("blhe,bmhe->bhlm", q, k) * q.shape[-1] ** -0.5
  logits = jnp.where(attention_mask(segment_ids, image_ids), logits, -1e30)
  return jnp.einsum("bhlm,bmhe->blhe", jax.nn.softmax(logits, axis=-1), v)


def output_and_grads(attend, q, k, v, d_out):
  out, vjp = jax.vjp(attend, q, k, v)
  return (out, *vjp(d_out.astype(out.dtype)))


# (dtype, length, query heads, kv heads, block_q, block_k, rows): GQA ratios 1, 2, 4; lengths
# that are multiples of the blocks and not (100 pads to 128, 160 to 192); f32 and bf16. (Each
# case interprets the kernels for about 20 s: three cases cover it.)
CASES = [
    (jnp.float32, 128, 2, 2, 32, 32, 3),
    (jnp.float32, 100, 4, 2, 32, 32, 2),
    (jnp.bfloat16, 160, 4, 1, 64, 32, 2),
]


def assert_matches_reference(attention, dtype, length, heads, kv_heads, rows):
  """`attention(q, k, v, start, limit)` on rows_with_long_document: outputs and q, k, v
  gradients equal the plain masked softmax's (non-padding rows; padding rows exactly zero)."""
  segment_ids, image_ids = rows_with_long_document(length, rows, seed=length + heads)
  rows = segment_ids.shape[0]
  start, limit = key_ranges(segment_ids, image_ids)
  keys = jax.random.split(jax.random.key(length), 4)
  e = 16
  q = jax.random.normal(keys[0], (rows, length, heads, e), dtype)
  k = jax.random.normal(keys[1], (rows, length, kv_heads, e), dtype)
  v = jax.random.normal(keys[2], (rows, length, kv_heads, e), dtype)
  # Padding rows carry no loss: their cotangent is zero, as in training.
  real = (segment_ids > 0)[:, :, None, None]
  d_out = jax.random.normal(keys[3], q.shape, jnp.float32) * real

  kernel = jax.jit(lambda *x: output_and_grads(
      lambda q, k, v: attention(q, k, v, start, limit), *x))
  plain = jax.jit(lambda *x: output_and_grads(
      lambda q, k, v: reference(q, k, v, segment_ids, image_ids), *x))
  got = kernel(q, k, v, d_out)
  want = plain(q, k, v, d_out)
  assert [x.dtype for x in got] == [dtype] * 4
  assert [x.shape for x in got] == [q.shape, q.shape, k.shape, k.shape]
  # The kernel's empty-range rows are zero; the reference spreads them over all keys.
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


@pytest.mark.parametrize("dtype,length,heads,kv_heads,block_q,block_k,rows", CASES)
def test_flash_attention_matches_reference(dtype, length, heads, kv_heads, block_q, block_k,
                                           rows):
  attention = functools.partial(flash_attention, block_q=block_q, block_k=block_k,
                                interpret=INTERPRET)
  assert_matches_reference(attention, dtype, length, heads, kv_heads, rows)


def tiles_with_allowed_keys(start, limit, block_q, block_k):
  """[B, N, M] from the dense mask: tiles holding at least one allowed (query, key) pair."""
  mask = np.asarray(mask_from_ranges(start, limit))[:, 0]
  b, l, _ = mask.shape
  return mask.reshape(b, l // block_q, block_q, l // block_k, block_k).any(axis=(2, 4))


def test_visited_tiles():
  length, block = 256, 32
  n = length // block
  # One causal document: the tiles on and below the diagonal, (n + 1) / 2n of them.
  no_images = jnp.full((1, length), -1, jnp.int32)
  start, limit = key_ranges(jnp.ones((1, length), jnp.int32), no_images)
  visited = visited_tiles(start, limit, block, block)
  assert visited.shape == (1, n, n)
  assert int(visited.sum()) == n * (n + 1) // 2
  np.testing.assert_array_equal(visited[0], np.tril(np.ones((n, n), bool)))
  # Documents of half a block: only the diagonal tiles.
  short_docs = jnp.repeat(jnp.arange(1, 2 * n + 1, dtype=jnp.int32), block // 2)[None]
  start, limit = key_ranges(short_docs, no_images)
  assert int(visited_tiles(start, limit, block, block).sum()) == n
  # Packed rows with images and padding: exactly the tiles that hold an allowed key.
  rng = np.random.default_rng(1)
  rows = [packed_row(rng, length, EDGE_DOCS, padding=int(rng.integers(0, 90))) for _ in range(8)]
  segment_ids, image_ids = (jnp.asarray(np.stack(x)) for x in zip(*rows))
  start, limit = key_ranges(segment_ids, image_ids)
  for block_q, block_k in ((32, 32), (64, 32), (32, 64)):
    np.testing.assert_array_equal(visited_tiles(start, limit, block_q, block_k),
                                  tiles_with_allowed_keys(start, limit, block_q, block_k))
  # An unpadded length pads with empty rows: no extra tiles visited.
  assert int(visited_tiles(start[:, :250], limit[:, :250], 32, 32).sum()) <= int(
      visited_tiles(start, limit, 32, 32).sum())


# The deviceless compile checks' shape: bf16, L 2048, 8 query heads over 2 kv heads of 128.
COMPILE_SHAPE = dict(b=1, l=2048, h=8, kv=2, e=128)


def lowered_forward_backward(attention, device):
  """jit(value_and_grad) of sum(attention(q, k, v, start, limit)) lowered for one compile-only
  `device` at COMPILE_SHAPE."""
  b, l, h, kv, e = COMPILE_SHAPE.values()
  place = jax.sharding.SingleDeviceSharding(device)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=place)
  args = (spec((b, l, h, e), jnp.bfloat16), spec((b, l, kv, e), jnp.bfloat16),
          spec((b, l, kv, e), jnp.bfloat16), spec((b, l), jnp.int32), spec((b, l), jnp.int32))

  def step(q, k, v, start, limit):
    loss = lambda q, k, v: jnp.sum(attention(q, k, v, start, limit).astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
  return jax.jit(step).lower(*args)


def assert_no_scores(compiled):
  """Temporaries far below the L x L x H f32 scores XLA's attention would hold (128 MiB)."""
  temp = compiled.memory_analysis().temp_size_in_bytes
  scores = COMPILE_SHAPE["l"] ** 2 * COMPILE_SHAPE["h"] * 4
  assert 0 < temp < scores / 16, temp


def test_compiles_for_tpu_without_scores():
  """v5p, blocks of 512: Mosaic accepts the forward and both backward kernels, and the step's
  temporaries are far below the 128 MiB of materialised f32 scores."""
  pytest.importorskip("libtpu")
  from nmm_jax.compile import topologies
  attention = functools.partial(flash_attention, block_q=512, block_k=512)
  lowered = lowered_forward_backward(attention, topologies.target("v5p-8").devices[0])
  with topologies.quiet_stderr():
    compiled = lowered.compile()
  assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 3
  assert_no_scores(compiled)
