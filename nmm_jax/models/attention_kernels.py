"""The attention implementations behind model.attention, for the full-sequence (training,
scoring, prefill) path: the mask each one reads, and how it runs on the mesh.

* "xla": attention.dot_product_attention, the [B, H, L, L] scores in XLA (any backend).
* "flash": Pallas kernels reading the mask as one key range per query (key_ranges.py): the
  Mosaic kernel (flash_attention.py) on TPU, the Triton one (flash_attention_gpu.py) on GPU, the
  Mosaic kernel in Pallas' interpreter elsewhere (CPU tests). Which one is chosen when the step
  is lowered for its devices (lax.platform_dependent), so nmm-compile's TPU and H100 targets get
  theirs from this CPU machine.
* "cudnn": jax.nn.dot_product_attention(implementation="cudnn") with the dense mask (GPU only):
  cuDNN's fused kernel, which streams the scores but reads the whole [B, 1, L, L] mask and
  computes masked tiles (no skipping).
* "auto": "flash" on TPU and NVIDIA GPUs (head dims Triton takes), "xla" elsewhere
  (`resolved`: the train program decides it for its mesh's devices, a model built elsewhere
  for JAX's default backend).

A Pallas call is one program per device, so "flash" runs in a shard_map over the mesh, laid out
as the attention activations' logical axes say (batch over the batch axes, heads over tensor).
"""
import functools
from typing import NamedTuple

import jax

from nmm_jax import sharding
from nmm_jax.models import flash_attention as mosaic
from nmm_jax.models import flash_attention_gpu as triton
from nmm_jax.models.key_ranges import key_ranges

Q_AXES = ("batch", "activation_q_length", "activation_heads", None)
KV_AXES = ("batch", "activation_kv_length", "activation_kv_heads", None)


class KeyRanges(NamedTuple):
  """The mask as flash attention reads it: query q may see keys start[q] <= k < limit[q]."""
  start_BxL: jax.Array
  limit_BxL: jax.Array


def resolved(model_cfg, platform: str | None = None):
  """`model_cfg` with model.attention="auto" replaced by what it means on `platform` (default:
  JAX's default backend); other values unchanged."""
  if model_cfg.attention != "auto":
    return model_cfg
  platform = platform or jax.default_backend()
  # Flash where a kernel is compiled for the platform: Mosaic on TPU; Triton on NVIDIA GPUs for
  # head dims it takes (powers of two >= 16). ROCm and other backends get XLA's attention.
  triton_head = model_cfg.head_dim >= 16 and model_cfg.head_dim & (model_cfg.head_dim - 1) == 0
  choice = "flash" if platform == "tpu" or (platform in ("gpu", "cuda") and triton_head) else "xla"
  model_cfg = model_cfg.copy_and_resolve_references()
  with model_cfg.unlocked():
    model_cfg.attention = choice
  return model_cfg


def attention_mask_for(implementation: str, segment_ids_BxL, image_ids_BxL, dense_mask):
  """What `implementation` reads as its mask: KeyRanges for flash, the [B, 1, L, L]
  `dense_mask(segment_ids, image_ids)` otherwise."""
  if implementation == "flash":
    return KeyRanges(*key_ranges(segment_ids_BxL, image_ids_BxL))
  return dense_mask(segment_ids_BxL, image_ids_BxL)


def attend(implementation: str, q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, mask, dot_product, *,
           block_q: int, block_k: int):
  """Attention outputs [B, L, H, E] (q's dtype). `mask`: what attention_mask_for gave;
  `dot_product(q, k, v, dense_mask)`: the XLA implementation."""
  if implementation == "xla":
    return dot_product(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, mask)
  if implementation == "cudnn":
    return jax.nn.dot_product_attention(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, mask=mask,
                                        implementation="cudnn")
  if implementation != "flash":
    raise ValueError(f"model.attention: {implementation!r} (resolve 'auto' first)")
  kernels = functools.partial(_flash_on_platform, block_q=block_q, block_k=block_k)
  return _on_mesh(kernels, q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, mask)


# Tile sizes where model.flash_block_* is 0. TPU: large tiles keep the MXU busy and amortise the
# grid steps. GPU: 64 x 64 at head dim 128 fits Triton's registers without spills (ptxas on the
# compiled H100 kernels: 196 registers in dk/dv at 8 warps; 128 x 64 spills). Interpreted: small.
DEFAULT_BLOCKS = {"tpu": 512, "cuda": 64, "interpret": 128}


def _flash_on_platform(q, k, v, start, limit, *, block_q, block_k):
  """The kernel of the platform the step is lowered for: Mosaic on TPU, Triton on GPU, the
  Mosaic kernel in Pallas' interpreter elsewhere (slow: for tests)."""
  def blocks(platform):
    return dict(block_q=block_q or DEFAULT_BLOCKS[platform],
                block_k=block_k or DEFAULT_BLOCKS[platform])
  return jax.lax.platform_dependent(
      q, k, v, start, limit, tpu=functools.partial(mosaic.flash_attention, **blocks("tpu")),
      cuda=functools.partial(triton.flash_attention_gpu, **blocks("cuda")),
      default=functools.partial(mosaic.flash_attention, **blocks("interpret"), interpret=True))


def _on_mesh(kernel, q, k, v, ranges: KeyRanges):
  """`kernel` in a shard_map over the context mesh (as one program without one)."""
  mesh = sharding.traced_mesh()
  if mesh is None:
    return kernel(q, k, v, *ranges)
  rules = sharding.traced_rules()
  q_spec = sharding.logical_to_spec(Q_AXES, rules, mesh, shape=q.shape)
  kv_spec = sharding.logical_to_spec(KV_AXES, rules, mesh, shape=k.shape)
  if q_spec[1] is not None or kv_spec[1] is not None:
    raise ValueError(f"flash attention needs whole sequences on each device (key ranges are "
                     f"positions in the row), got {q_spec} and {kv_spec}")
  if q_spec[2] != kv_spec[2]:
    # Query heads split over tensor but kv heads not: each device's query heads would map to
    # the wrong kv heads. validate() refuses such configs; this catches custom rules.
    raise ValueError(f"flash attention needs query and kv heads split alike, got {q_spec} and "
                     f"{kv_spec}")
  range_spec = jax.sharding.PartitionSpec(q_spec[0], q_spec[1])
  # check_vma off: a pallas_call's outputs carry no record of the mesh axes they vary over.
  sharded = jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, range_spec,
                                                       range_spec), out_specs=q_spec,
                          check_vma=False)
  return sharded(q, k, v, *ranges)
