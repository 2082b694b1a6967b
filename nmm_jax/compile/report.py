"""The train step of a config compiled for a target (nmm_jax.compile.topologies), and what the
compiled program says about it: memory per chip, FLOPs, collectives, compile time.

The step is the one the training loop runs (train/program.py): same shardings, donation, remat.
"""
import collections
import math
import re
import time

import jax
import numpy as np

from nmm_jax import config as config_lib
from nmm_jax import sharding
from nmm_jax.compile import hlo, topologies
from nmm_jax.data import pipeline
from nmm_jax.scaling import flops
from nmm_jax.train import program as program_lib

# "Ran out of memory on HBM, the total memory required for HLO temporaries (32.80G) exceeds ..."
_OUT_OF_MEMORY = re.compile(r"RESOURCE_EXHAUSTED: Ran out of memory.*?temporaries \(([\d.]+)G\)")
_Memory = collections.namedtuple("_Memory", "argument_size_in_bytes output_size_in_bytes "
                                 "alias_size_in_bytes temp_size_in_bytes")


def default_per_chip_batch(config, target) -> int:
  """The config's global batch spread over the target's chips; ValueError if it does not
  divide."""
  chips = len(target.devices)
  if config.train.batch_size % chips:
    raise ValueError(f"train.batch_size={config.train.batch_size} does not spread evenly over "
                     f"{chips} chips of {target.name}; pass --per_chip_batch")
  return config.train.batch_size // chips


def shard_bytes(abstract_tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard,
  i.e. the first device's: shards of one array have one shape)."""
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def _program(config, target, batch: int, **values):
  """(the config at this global batch and `values`, its mesh shape, its TrainProgram over the
  target's devices)."""
  config = config_lib.with_values(config, **{"train.batch_size": batch, **values})
  mesh_shape = config_lib.validate(config, len(target.devices))
  mesh = sharding.make_mesh(mesh_shape, target.devices, config_lib.dcn_shape(config.mesh))
  return config, mesh_shape, program_lib.build(config, mesh, len(pipeline.source_names(config)))


def compile_step(config, target, per_chip_batch: int, count_flops: bool = False) -> dict:
  """Compiles the train step of `config` for `target` at `per_chip_batch` sequences per chip.

  `count_flops`: also compile it with every loop unrolled (decoder and encoder scans, one loss
  chunk), because XLA's cost analysis counts a loop body once; that compile is slower.
  """
  chips = len(target.devices)
  batch = per_chip_batch * chips
  config, mesh_shape, program = _program(config, target, batch)
  start = time.perf_counter()
  lowered = program_lib.lower_train_step(program, config, batch)
  state = program.abstract_state()
  with topologies.quiet_stderr():
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      # The TPU compiler refuses a program whose temporaries exceed the chip's HBM.
      required = _OUT_OF_MEMORY.search(str(e))
      if not required:
        raise
      compiled, temp = None, int(float(required.group(1)) * 2 ** 30)
  compile_s = time.perf_counter() - start

  if compiled is None:
    arguments = shard_bytes(state) + shard_bytes(program_lib.abstract_batch(program, config, batch))
    memory = _Memory(arguments, arguments, arguments, temp)
  else:
    memory = compiled.memory_analysis()
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  model_flops = flops.train_flops_per_sequence(config.model, config.data.seq_len,
                                               config.data.max_images) * batch
  report = {
      "topology": target.name, "chips": chips, "device_kind": target.device_kind,
      "platform": target.platform, "mesh": mesh_shape, "per_chip_batch": per_chip_batch,
      "global_batch": batch, "seq_len": config.data.seq_len, "dtype": config.model.dtype,
      "remat": config.model.remat,
      "params": flops.param_counts(config.model)["total"],
      "param_bytes": shard_bytes(state["params"]),
      "optimizer_bytes": shard_bytes(state["opt_state"]),
      "argument_bytes": memory.argument_size_in_bytes,
      "output_bytes": memory.output_size_in_bytes,
      "alias_bytes": memory.alias_size_in_bytes,
      "temp_bytes": memory.temp_size_in_bytes,
      # A program the compiler refused does not fit, whatever the estimate says.
      "peak_bytes": peak, "hbm_bytes": target.hbm_bytes,
      # The compiler's own peak, when it gives one (libtpu, XLA:GPU): the most HBM its buffers
      # hold at once. libtpu's temporaries figure (temp_bytes) is larger, by 0.4-0.6 GiB in
      # the late models on v5p-8, beyond the buffers the HLO dump's buffer assignment lists;
      # the fit and the table keep the larger, conservative sum (peak_bytes).
      "compiler_peak_bytes": getattr(memory, "peak_memory_in_bytes", 0) or None,
      "fits": compiled is not None and peak <= target.hbm_bytes,
      "margin_bytes": target.hbm_bytes - peak,
      "model_flops_per_chip": model_flops / chips,
      "compiled_flops_per_chip": None,
      "collectives": hlo.collectives(compiled.as_text()) if compiled is not None else None,
      "compile_s": round(compile_s, 2),
      "compiler_refused": compiled is None,
  }
  if count_flops and compiled is not None:
    report["compiled_flops_per_chip"] = unrolled_flops(config, target, per_chip_batch)
  return report


def unrolled_flops(config, target, per_chip_batch: int):
  """FLOPs per chip of the step with no loops (None where the backend has no cost analysis:
  the CUDA plugin). Counted with XLA's attention: cost analysis cannot see inside a Pallas
  kernel, so the flash step would count no attention FLOPs at all."""
  batch = per_chip_batch * len(target.devices)
  m = config.model
  depth = max(m.num_layers, m.vision.num_layers if m.fusion == "late" else 1)
  config, _, program = _program(config, target, batch, **{"model.scan_unroll": depth,
                                                          "train.loss_chunk": config.data.seq_len,
                                                          "model.attention": "xla"})
  lowered = program_lib.lower_train_step(program, config, batch)
  with topologies.quiet_stderr():
    cost = lowered.compile().cost_analysis()
  if isinstance(cost, list):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def max_per_chip_batch(config, target, limit: int = 4096, log=print, known=None,
                       exact: bool = True):
  """(largest per-chip batch whose step fits the target's memory, the report at it; at 0, the
  report at 1).

  Peak memory is close to affine in the batch, so two compiles (1 and another size: one in
  `known`, {per-chip batch: report} already compiled, or 2) predict the answer; a compile at the
  prediction and galloping from it bracket the answer, and bisection settles it. Not `exact`:
  the prediction is compiled and, while it does not fit, predicted again from batch 1 and the
  failure (at least 10% lower each time); the first batch that fits is returned, a lower bound
  in three or four compiles (XLA:GPU rematerialises more near the top of HBM, so there the
  prediction falls short: early-275m on h100-8 gives 487, where bisection without the flag
  preset found 567; on TPU the peak grows faster near the top, and the first prediction
  overshoots)."""
  reports = dict(known or {})

  def fits(b):
    if b not in reports:
      reports[b] = compile_step(config, target, b)
      r = reports[b]
      log(f"  per-chip batch {b:5d}: peak {r['peak_bytes'] / 2**30:7.2f} GiB of "
          f"{r['hbm_bytes'] / 2**30:.1f} ({'fits' if r['fits'] else 'does not fit'}, "
          f"compile {r['compile_s']:.1f} s)")
    return reports[b]["fits"]

  def bracket():
    lo = max(b for b, r in reports.items() if r["fits"])
    hi = min((b for b, r in reports.items() if not r["fits"]), default=limit + 1)
    return lo, hi

  if not fits(1):
    return 0, reports[1]
  other = max((b for b in reports if b > 1), default=2)
  fits(other)
  per_row = (reports[other]["peak_bytes"] - reports[1]["peak_bytes"]) / (other - 1)
  fixed = reports[1]["peak_bytes"] - per_row
  guess = limit if per_row <= 0 else int((target.hbm_bytes - fixed) // per_row)
  if not exact:
    guess = min(max(guess, 1), limit)
    while not fits(guess) and guess > 1:
      # The line through batch 1 and this failure predicts again (peak grows faster than the
      # first line near the top of HBM); at least 10% lower each time.
      slope = (reports[guess]["peak_bytes"] - reports[1]["peak_bytes"]) / (guess - 1)
      again = int((target.hbm_bytes - reports[1]["peak_bytes"]) // slope) + 1
      guess = max(min(again, int(guess * 0.9)), 1)
    lo, _ = bracket()
    return lo, reports[lo]
  lo, hi = bracket()
  if hi - lo > 1:
    guess = min(max(guess, lo + 1), hi - 1)
    # Gallop away from the guess on the side it fell, doubling the step, until the answer is
    # bracketed; then bisect.
    upwards, step = fits(guess), 1
    lo, hi = bracket()
    while hi - lo > 1:
      probe = guess + step if upwards else guess - step
      if not lo < probe < hi or fits(probe) != upwards:
        break
      step *= 2
      lo, hi = bracket()
    lo, hi = bracket()
  while hi - lo > 1:
    fits((lo + hi) // 2)
    lo, hi = bracket()
  return lo, reports[lo]
