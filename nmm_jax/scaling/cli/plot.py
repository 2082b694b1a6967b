"""nmm-scaling plot: PNGs of a runs table.

  nmm-scaling plot --csv=runs.csv --out=plots/

isoflop.png (loss vs N per budget, the fitted law's curves, the minima), frontier.png
(compute-optimal N vs C), loss_vs_compute.png (runs, lowest-loss frontier, its power law) and
per_source.png (the same for every loss/<source> column). With fewer than 5 runs the law is not
fitted and its curves are left out.
"""
import os

from absl import flags

from nmm_jax.scaling import fit as fit_lib
from nmm_jax.scaling import plots
from nmm_jax.scaling.table import read_runs

flags.DEFINE_string("csv", None, "Runs table.")
flags.DEFINE_string("out", None, "Folder for the PNGs.")
flags.DEFINE_string("target", "loss", "Loss column of the main plots.")
flags.DEFINE_integer("workers", os.cpu_count() or 1, "Processes sharing the fit's grid.")
flags.mark_flags_as_required(["csv", "out"])
FLAGS = flags.FLAGS
MIN_RUNS_TO_FIT = 5


def main(argv):
  del argv
  runs = read_runs(FLAGS.csv, target=FLAGS.target)
  os.makedirs(FLAGS.out, exist_ok=True)
  law = None
  if len(runs["N"]) >= MIN_RUNS_TO_FIT:
    law, _ = fit_lib.fit(runs["N"], runs["D"], runs["loss"], workers=FLAGS.workers)
  paths = {name: os.path.join(FLAGS.out, f"{name}.png")
           for name in ("isoflop", "frontier", "loss_vs_compute", "per_source")}
  minima = plots.isoflop_plot(runs, law, paths["isoflop"], FLAGS.target)
  plots.frontier_plot(runs, law, minima, paths["frontier"])
  plots.loss_vs_compute_plot(runs, paths["loss_vs_compute"], FLAGS.target)
  sources = [c for c in runs["rows"][0] if c.startswith("loss/")]
  plots.per_source_plot({t: read_runs(FLAGS.csv, target=t) for t in [FLAGS.target] + sources},
                        paths["per_source"])
  for path in paths.values():
    print(f"wrote {path}")
  if law is None:
    print(f"fewer than {MIN_RUNS_TO_FIT} runs: the law is not fitted, its curves are left out")
