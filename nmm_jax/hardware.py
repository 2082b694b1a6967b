"""Device facts: peak FLOP/s (datasheet figures for accelerators, a measured matmul for anything)
and peak memory."""
import resource
import time

import jax
import jax.numpy as jnp

# Dense peak TFLOP/s per device. float32 on NVIDIA is the TF32 tensor-core rate: XLA runs f32
# matmuls in TF32 there by default.
DATASHEET_TFLOPS = {
    "NVIDIA H100": {"bfloat16": 989.0, "float32": 494.0},   # SXM, dense, float32 = TF32
    "NVIDIA H200": {"bfloat16": 989.0, "float32": 494.0},
    "NVIDIA A100": {"bfloat16": 312.0, "float32": 156.0},
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
    # v5p chips call themselves "TPU v5": matched after "TPU v5 lite" (first prefix wins).
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v5": {"bfloat16": 459.0, "float32": 459.0},
    "TPU v6 lite": {"bfloat16": 918.0, "float32": 918.0},
}


def datasheet_tflops(device, dtype: str):
  for name, peaks in DATASHEET_TFLOPS.items():
    if device.device_kind.startswith(name):
      return peaks[dtype]
  return None


def measure_matmul_tflops(dtype: str, size: int, repeats: int = 5, m: int | None = None,
                          n: int | None = None) -> float:
  """Best-of-`repeats` TFLOP/s of an [m, size] x [size, n] matmul (square by default) on the
  first device."""
  m, n = m or size, n or size
  device = jax.devices()[0]
  a = jax.device_put(jax.random.normal(jax.random.key(0), (m, size), dtype), device)
  b = jax.device_put(jax.random.normal(jax.random.key(1), (size, n), dtype), device)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * m * size * n / best / 1e12


def measure_peak_tflops(dtype: str, size: int) -> float:
  """The device's best matmul rate over a square [size]^3 product and a transformer-layer shape
  ([4096, 512] x [512, 2048]); on CPUs the layer shape can beat large squares (cache), and MFU
  must be measured against the best the device can do, not a flattering low figure."""
  square = measure_matmul_tflops(dtype, size, repeats=10)
  layer = measure_matmul_tflops(dtype, 512, repeats=20, m=4096, n=2048)
  return max(square, layer)


def peak_tflops_per_device(dtype: str) -> float:
  """Datasheet peak where known, else a quick measured one (CPU)."""
  device = jax.devices()[0]
  return datasheet_tflops(device, dtype) or measure_matmul_tflops(dtype, 1024, repeats=3)


def peak_memory_bytes():
  """(bytes, what they measure): the device's peak when it reports one, else the process's
  peak resident memory (CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"], "device peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"
