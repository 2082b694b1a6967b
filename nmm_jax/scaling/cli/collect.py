"""nmm-scaling collect: a runs table from training workdirs.

  nmm-scaling collect runs/sweep/* --out=runs.csv

Columns: N (parameters the compute counts), N_total, D (tokens), C (FLOPs), loss and loss/<source>
(held-out, at the last checkpoint), run, width, steps, and budget for sweep runs. Folders that
are not finished runs are listed and left out.
"""
import glob
import os
import sys

from absl import flags

from nmm_jax.scaling.collect import collect_run
from nmm_jax.scaling.table import write_runs

flags.DEFINE_string("out", None, "CSV to write.")
flags.mark_flags_as_required(["out"])
FLAGS = flags.FLAGS


def main(argv):
  workdirs = sorted({p for pattern in argv[1:] for p in (glob.glob(pattern) or [pattern])
                     if os.path.isdir(p)})
  if not workdirs:
    raise FileNotFoundError(f"no run folders among {argv[1:]}")
  rows = []
  for workdir in workdirs:
    try:
      rows.append(collect_run(workdir))
    except ValueError as e:
      print(f"left out {e}", file=sys.stderr)
  if not rows:
    raise ValueError("none of the folders holds a finished run")
  write_runs(FLAGS.out, rows)
  print(f"wrote {FLAGS.out}: {len(rows)} runs")
  for r in rows:
    print(f"  {r['run']:16s} N {r['N']:>10,}  D {r['D']:>11,}  C {r['C']:.3g}  "
          f"loss {r['loss']:.4f}")
