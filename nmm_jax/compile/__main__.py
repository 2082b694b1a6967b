r"""Compile a config's train step for accelerators that are not attached, and say whether it fits.

  nmm-compile --config=configs/paper.py:early-932m --topology=v5p-64 \
      [--per_chip_batch=N | --max_batch] [--json] [--noflops] [--config.key=value ...]

Topologies: v4-N, v5p-N, v5e-N, v6e-N (Cloud TPU slice names; libtpu, in the test extra),
h100-8 (the CUDA plugin: the compile-gpu extra), cpu-N (this host's CPU devices). Prints per
chip: parameter and optimizer bytes, temporaries, the peak estimate against the chip's HBM, the
compiled FLOPs against scaling/flops.py's model FLOPs, the collectives and the compile time. The
last line is one JSON object with all of it.
"""
import os
import re
import sys


def _prepare_environment(argv):
  """Before JAX starts: compile-only targets need no attached device, so JAX runs on the CPU
  (on a TPU VM this leaves the chips to the job that holds them); cpu-N needs N host devices."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # absl takes both --topology=cpu-8 and --topology cpu-8 (and one dash).
  joined = [f"{a}={b}" if re.fullmatch(r"--?topology", a) else a for a, b in zip(argv, argv[1:])]
  for arg in joined + argv[-1:]:
    match = re.fullmatch(r"--?topology=cpu-(\d+)", arg)
    if match:
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                                 f"device_count={match.group(1)}").strip()


_prepare_environment(sys.argv)

import json  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "v5p-64, v6e-256, h100-8, cpu-8 ...")
_PER_CHIP_BATCH = flags.DEFINE_integer("per_chip_batch", None, "Sequences per chip (global "
                                       "batch = this x chips); default: the config's "
                                       "train.batch_size spread over the chips.")
_MAX_BATCH = flags.DEFINE_bool("max_batch", False, "Find the largest per-chip batch that fits.")
_JSON = flags.DEFINE_bool("json", False, "Print the JSON line only.")
_FLOPS = flags.DEFINE_bool("flops", True, "Also compile the step with its loops unrolled, for "
                           "its FLOPs (XLA counts a loop body once); slower.")
flags.mark_flags_as_required(["config", "topology"])

GIB = 2 ** 30


def _gib(n):
  for unit, size in (("GiB", GIB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if abs(n) >= size:
      return f"{n / size:8.2f} {unit}"
  return f"{n:8d} B  "


def describe(r) -> str:
  """The human-readable report."""
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines = [
      f"{r['topology']}: {r['chips']} x {r['device_kind']} | mesh {mesh} | per-chip batch "
      f"{r['per_chip_batch']} x {r['seq_len']} tokens (global {r['global_batch']}) | "
      f"{r['dtype']} compute, remat {r['remat']} | {r['params'] / 1e9:.3f} B parameters",
      "per chip:",
      f"  parameters (f32)  {_gib(r['param_bytes'])}",
      f"  optimizer state   {_gib(r['optimizer_bytes'])}",
      f"  arguments         {_gib(r['argument_bytes'])}  (state + batch; outputs alias them)",
      f"  temporaries       {_gib(r['temp_bytes'])}",
      f"  peak estimate     {_gib(r['peak_bytes'])}  of {r['hbm_bytes'] / GIB:.1f} GiB HBM: "
      + (f"fits, {r['margin_bytes'] / GIB:.2f} GiB "
         f"({100 * r['margin_bytes'] / r['hbm_bytes']:.0f} %) to spare" if r["fits"] else
         f"DOES NOT FIT, {-r['margin_bytes'] / GIB:.2f} GiB over"),
  ]
  if r.get("compiler_peak_bytes"):
    lines.append(f"  compiler's peak   {_gib(r['compiler_peak_bytes'])}  (the compiler's own "
                 f"live-buffer peak; the estimate above counts every temporary it reports)")
  model = r["model_flops_per_chip"]
  if r["compiled_flops_per_chip"]:
    compiled = r["compiled_flops_per_chip"]
    lines.append(f"FLOPs per chip: compiled {compiled:.3e}, model {model:.3e} "
                 f"(compiled / model {compiled / model:.2f}: the compiled step also counts "
                 f"masked attention, and remat's recomputed forward)")
  else:
    lines.append(f"FLOPs per chip: model {model:.3e} (no compiled count: --noflops, or the "
                 f"backend has no cost analysis)")
  if r["compiler_refused"]:
    lines.append("the compiler refused the program: its temporaries exceed the chip's HBM "
                 "(the temporaries above are what it asked for)")
    lines.append(f"compile {r['compile_s']:.1f} s")
    return "\n".join(lines)
  lines.append("collectives per step (runs: ops x loop trips; bytes: results moved per chip):")
  for c in r["collectives"] or [{"kind": "none", "count": 0, "executed": 0, "bytes": 0}]:
    lines.append(f"  {c['kind']:20s} {c['count']:4d} ops {c['executed']:6d} runs "
                 f"{_gib(c['bytes'])}")
    if c["kind"] == "ragged-all-to-all":
      lines.append("    (the receive buffers' size: an upper bound, the rows sent depend on the "
                   "routing)")
  lines.append(f"compile {r['compile_s']:.1f} s, train.xla_flags={r.get('xla_flags', 'auto')}")
  return "\n".join(lines)


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from nmm_jax import xla_flags
  from nmm_jax.compile import report, topologies
  from nmm_jax.config import ConfigError
  if _MAX_BATCH.value and _PER_CHIP_BATCH.value is not None:
    sys.exit("nmm-compile: --per_chip_batch and --max_batch exclude each other (--max_batch "
             "searches the per-chip batch)")
  quiet = _JSON.value
  log = (lambda *a, **k: None) if quiet else print
  try:
    config = _CONFIG.value
    # The program is compiled with the flags the run would use (libtpu and the CUDA plugin read
    # them when the target's compile-only devices are made).
    xla_flags.apply(config.train.xla_flags)
    target = topologies.target(_TOPOLOGY.value)
    if _MAX_BATCH.value:
      log(f"searching the largest per-chip batch on {target.name}:")
      best, result = report.max_per_chip_batch(config, target, log=log)
      result = dict(result, max_per_chip_batch=best)
      if best and _FLOPS.value:
        result["compiled_flops_per_chip"] = report.unrolled_flops(config, target, best)
    else:
      per_chip = _PER_CHIP_BATCH.value or report.default_per_chip_batch(config, target)
      result = report.compile_step(config, target, per_chip, count_flops=_FLOPS.value)
  except (ConfigError, topologies.TopologyError, ValueError) as e:
    sys.exit(f"nmm-compile: {e}")
  result["xla_flags"] = config.train.xla_flags
  log(describe(result))
  print(json.dumps(result))


def run():
  app.run(main)


if __name__ == "__main__":
  run()
