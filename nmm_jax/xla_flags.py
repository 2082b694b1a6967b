"""Compiler flag presets that let collectives overlap compute, per platform (train.xla_flags).

XLA reads its flags from the environment once, when a backend starts: LIBTPU_INIT_ARGS for the
TPU compiler (libtpu), XLA_FLAGS for the others (the GPU flags below are inert on CPU). So the
preset is applied before JAX touches a device: by nmm-train and nmm-compile right after their
flags are parsed. A flag already in the environment wins over the preset's value for it, so a
user's own setting is never overridden. Every flag here is one the pinned jaxlib and libtpu know:
an unknown flag stops the backend at start-up (tests/test_xla_flags.py starts both with them).
"""
import os

PRESETS = ("auto", "none")

# Async collectives fused with compute and scheduled to overlap it (MaxText's TPU defaults).
TPU_FLAGS = (
    ("xla_tpu_enable_async_collective_fusion", "true"),
    ("xla_tpu_enable_async_collective_fusion_fuse_all_gather", "true"),
    ("xla_tpu_enable_async_collective_fusion_multiple_steps", "true"),
    ("xla_tpu_overlap_compute_collective_tc", "true"),
    ("xla_enable_async_all_gather", "true"),
    ("xla_enable_async_collective_permute", "true"),
    ("xla_tpu_enable_data_parallel_all_reduce_opt", "true"),
    ("xla_tpu_data_parallel_opt_different_sized_ops", "true"),
)

# The latency-hiding scheduler overlaps collectives with compute; pipelining moves each layer's
# FSDP gather (and gradient reduce-scatter) into the previous (next) loop iteration; combining
# small collectives up to 128 MiB cuts their launch overhead (JAX's GPU performance guide).
GPU_FLAGS = (
    ("xla_gpu_enable_latency_hiding_scheduler", "true"),
    ("xla_gpu_enable_pipelined_all_gather", "true"),
    ("xla_gpu_enable_pipelined_reduce_scatter", "true"),
    ("xla_gpu_enable_pipelined_all_reduce", "true"),
    ("xla_gpu_enable_while_loop_double_buffering", "true"),
    ("xla_gpu_all_gather_combine_threshold_bytes", "134217728"),
    ("xla_gpu_reduce_scatter_combine_threshold_bytes", "134217728"),
    ("xla_gpu_all_reduce_combine_threshold_bytes", "134217728"),
)


def merged(existing: str, flags) -> str:
  """`existing` (a flag string from the environment) with each of `flags` it does not already
  set appended."""
  present = {word.split("=", 1)[0].lstrip("-") for word in existing.split()}
  added = [f"--{name}={value}" for name, value in flags if name not in present]
  return " ".join([existing.strip(), *added]).strip()


def apply(preset: str, environ=os.environ) -> None:
  """Puts the preset's flags into `environ`; call before any JAX backend starts. ValueError for
  a preset that is not in PRESETS."""
  if preset not in PRESETS:
    raise ValueError(f"train.xla_flags must be one of {', '.join(PRESETS)}, got {preset!r}")
  if preset == "none":
    return
  environ["LIBTPU_INIT_ARGS"] = merged(environ.get("LIBTPU_INIT_ARGS", ""), TPU_FLAGS)
  environ["XLA_FLAGS"] = merged(environ.get("XLA_FLAGS", ""), GPU_FLAGS)
