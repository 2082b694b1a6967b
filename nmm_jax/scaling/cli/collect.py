"""nmm-scaling collect: a runs table from training workdirs.

  nmm-scaling collect runs/sweep/* --out=runs.csv

Columns: N (parameters the compute counts), N_total, D (tokens), C (FLOPs), loss and loss/<source>
(held-out, at the last checkpoint), run, width, steps, seed, and budget for sweep runs. Folders
that are not finished runs are listed and left out. Seeds of one run (a sweep's --seeds: NAME_s0,
NAME_s1, ...) become one row: losses averaged, loss_sd their standard deviation, seeds their
number (--noaverage_seeds: one row per run).
"""
import glob
import os
import sys

from absl import flags

from nmm_jax.scaling.collect import average_seeds, collect_run
from nmm_jax.scaling.table import write_runs

flags.DEFINE_string("out", None, "CSV to write.")
flags.DEFINE_bool("average_seeds", True, "One row per run trained with several seeds (NAME_sK).")
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
  found = len(rows)
  if FLAGS.average_seeds:
    rows = average_seeds(rows)
  write_runs(FLAGS.out, rows)
  print(f"wrote {FLAGS.out}: {len(rows)} rows from {found} runs")
  for r in rows:
    spread = (f"  (mean of {r['seeds']} seeds, sd {r['loss_sd']:.4f})"
              if r.get("seeds", 1) > 1 else "")
    print(f"  {r['run']:16s} N {r['N']:>10,}  D {r['D']:>11,}  C {r['C']:.3g}  "
          f"loss {r['loss']:.4f}{spread}")
