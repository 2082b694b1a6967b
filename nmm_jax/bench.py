r"""Benchmark the train step against this device's own measured matmul peak.

  python -m nmm_jax.bench --config=configs/bench.py

Prints the matmul peaks (f32, bf16; on GPUs/TPUs also the datasheet figure), then step time,
tokens/s, model TFLOP/s, MFU and peak memory; the last line is one JSON object with them all.
"""
import json
import time

import jax
import numpy as np
from absl import app, logging
from ml_collections import config_flags

from nmm_jax import xla_flags
from nmm_jax.data import batch as batch_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench.py", "Benchmark config.",
                                          lock_config=True)


def text_batch(config, seed: int = 0):
  """A full text-only batch: one document per row, every position scored."""
  b, l = config.train.batch_size, config.data.seq_len
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, config.model.vocab_size, size=(b, l + 1))
  batch = batch_lib.empty(batch_lib.shapes(b, l, keys=batch_lib.TOKEN_KEYS))  # no images
  batch["tokens"][:], batch["targets"][:] = tokens[:, :-1], tokens[:, 1:]
  batch["loss_mask"][:], batch["segment_ids"][:], batch["source"][:] = 1, 1, 0
  batch["positions"][:] = np.arange(l)
  return batch


def image_text_batch(config, images_per_row: int, seed: int = 0):
  """A full batch with `images_per_row` images at the start of each row's one document
  (<image_start>, one position per patch, <image_end> each), then text; text positions scored."""
  batch = text_batch(config, seed)
  b, l = batch["tokens"].shape
  patches = config.model.vision.num_patches  # (image side / patch_size)^2, both fusions
  side = int(round(patches ** 0.5)) * config.model.patch_size
  span = patches + 2
  if images_per_row * span >= l:
    raise ValueError(f"{images_per_row} images of {patches} patches do not fit data.seq_len={l}")
  for i in range(images_per_row):
    start = i * span + 1  # after <image_start>
    batch["image_ids"][:, start:start + patches] = i
    batch["patch_ids"][:, start:start + patches] = np.arange(patches)
    batch["loss_mask"][:, i * span:(i + 1) * span] = 0.0
  rng = np.random.default_rng(seed + 1)
  batch["images"] = rng.integers(0, 256, size=(b, images_per_row, side, side, 3), dtype=np.uint8)
  return batch


def benchmark(config) -> dict:
  from nmm_jax import config as config_lib
  from nmm_jax import hardware, sharding
  from nmm_jax.scaling import flops
  from nmm_jax.train import program as program_lib

  devices = jax.devices()
  mesh = sharding.make_mesh(config_lib.validate(config, len(devices)), devices,
                            config_lib.dcn_shape(config.mesh))
  device = devices[0]
  size = config.bench.matmul_size
  peaks = {dt: hardware.measure_peak_tflops(dt, size) for dt in ("float32", "bfloat16")}
  for dt, tflops in peaks.items():
    sheet = hardware.datasheet_tflops(device, dt)
    print(f"matmul peak {dt:8s}: {tflops:8.3f} TFLOP/s measured (best of {size}^3 and "
          f"4096x512x2048)"
          + (f", {sheet:.0f} datasheet ({tflops / sheet:.2f})" if sheet else ""))

  images_per_row = config.bench.get("images_per_row", 0)
  batch_np = (image_text_batch(config, images_per_row) if images_per_row else text_batch(config))
  program = program_lib.build(config, mesh, 1, batch_lib.ndims(batch_np))
  state = program.create_state(config)
  batch = {k: jax.device_put(v, program.batch_shardings[k]) for k, v in batch_np.items()}

  start = time.perf_counter()
  compiled = program.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  for _ in range(config.bench.warmup_steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(config.bench.timed_steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)

  step_s = float(np.median(times))
  step_flops = flops.train_flops_per_sequence(config.model, config.data.seq_len,
                                              images_per_row) * config.train.batch_size
  model_tflops = step_flops / step_s / 1e12
  peak = peaks[config.model.dtype] * len(devices)
  memory, memory_kind = hardware.peak_memory_bytes()
  result = {
      "device": device.device_kind, "platform": device.platform, "num_devices": len(devices),
      "dtype": config.model.dtype, "params": flops.param_counts(config.model)["total"],
      "fusion": config.model.fusion, "images_per_row": images_per_row,
      "compile_s": round(compile_s, 2), "step_time_s": step_s,
      "tokens_per_s": config.train.batch_size * config.data.seq_len / step_s,
      "model_tflops_per_s": model_tflops,
      "matmul_peak_tflops_f32": peaks["float32"], "matmul_peak_tflops_bf16": peaks["bfloat16"],
      "mfu": model_tflops / peak, "peak_memory_bytes": int(memory), "peak_memory_kind": memory_kind,
      "loss": float(metrics["loss"]),
  }
  sheet = hardware.datasheet_tflops(device, config.model.dtype)
  if sheet:
    result["mfu_datasheet"] = model_tflops / (sheet * len(devices))
  return result


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  xla_flags.apply(_CONFIG.value.train.xla_flags)  # before JAX starts a backend
  r = benchmark(_CONFIG.value)
  print(f"step time {r['step_time_s'] * 1e3:.1f} ms | {r['tokens_per_s']:.0f} tokens/s | "
        f"{r['model_tflops_per_s']:.3f} model TFLOP/s | MFU {r['mfu']:.3f} of measured "
        f"{r['dtype']} peak | peak memory {r['peak_memory_bytes'] / 2**30:.2f} GiB "
        f"({r['peak_memory_kind']}) | compile {r['compile_s']:.1f} s")
  print(json.dumps(r))


def run():
  app.run(main)


if __name__ == "__main__":
  run()
