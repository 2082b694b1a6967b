"""nmm-scaling fit: the Chinchilla approach-3 fit of a runs table.

  nmm-scaling fit --csv=runs.csv [--target=loss/caption] [--bootstrap=100] [--json]

Prints the coefficients with bootstrap intervals, the compute-optimal exponents a, b and
N*, D* at some budgets, and the L(C) power law on the lowest-loss frontier. With --json the last
line is one JSON object with all of it.
"""
import json
import os

import numpy as np
from absl import flags

from nmm_jax.scaling import fit as fit_lib
from nmm_jax.scaling.table import read_runs

flags.DEFINE_string("csv", None, "Runs table (nmm-scaling collect, or any CSV with N, D|C, loss).")
flags.DEFINE_string("target", "loss", "Loss column to fit, e.g. loss/caption.")
flags.DEFINE_string("n_column", "N", "Column of parameter counts.")
flags.DEFINE_string("d_column", "D", "Column of training tokens (if absent: C / 6N).")
flags.DEFINE_string("c_column", "C", "Column of training FLOPs.")
flags.DEFINE_integer("drop_highest", 0, "Leave out this many highest-loss runs.")
flags.DEFINE_integer("bootstrap", 100, "Bootstrap refits for the intervals (0: none).")
flags.DEFINE_list("budgets", [], "FLOP budgets for N*, D* (default: powers of ten over the "
                  "table's compute range, and one decade beyond).")
flags.DEFINE_integer("workers", os.cpu_count() or 1, "Processes sharing the initialisation grid.")
flags.DEFINE_bool("json", False, "End with one line of JSON.")
flags.mark_flags_as_required(["csv"])
FLAGS = flags.FLAGS


def default_budgets(C) -> list:
  low, high = int(np.floor(np.log10(C.min()))), int(np.ceil(np.log10(C.max()))) + 1
  return [float(10 ** k) for k in range(low, high + 1)]


def fit_table(runs, *, bootstrap: int, budgets, workers: int) -> dict:
  """Everything `fit` reports, as one dict."""
  law, objective = fit_lib.fit(runs["N"], runs["D"], runs["loss"], workers=workers)
  result = {**law.as_dict(), "objective": objective, "runs": int(len(runs["N"]))}
  if bootstrap:
    result["interval_95"] = fit_lib.bootstrap(runs["N"], runs["D"], runs["loss"], law,
                                              samples=bootstrap)
  N_opt, D_opt = law.optimal(budgets)
  result["optimal"] = [{"C": c, "N": float(n), "D": float(d), "loss": float(law.loss(n, d))}
                       for c, n, d in zip(budgets, N_opt, D_opt)]
  frontier = fit_lib.compute_frontier(runs["C"], runs["loss"])
  if len(frontier) >= 2:
    k, c = fit_lib.fit_power_law(runs["C"][frontier], runs["loss"][frontier])
    result["frontier"] = {"k": k, "c": c, "runs": int(len(frontier))}
  return result


def format_result(r: dict, target: str) -> str:
  ci = r.get("interval_95", {})

  def coef(name, fmt):
    text = format(r[name], fmt)
    if name in ci:
      text += f"  [{format(ci[name][0], fmt)}, {format(ci[name][1], fmt)}]"
    return f"  {name:6s} {text}"

  lines = [f"{target} = E + A / N^alpha + B / D^beta   ({r['runs']} runs, Huber objective "
           f"{r['objective']:.3g}; 95% bootstrap intervals)" if ci else
           f"{target} = E + A / N^alpha + B / D^beta   ({r['runs']} runs)"]
  lines += [coef("E", ".4g"), coef("A", ".4g"), coef("B", ".4g"), coef("alpha", ".4f"),
            coef("beta", ".4f"),
            "compute-optimal: N* ~ C^a, D* ~ C^b", coef("a", ".4f"), coef("b", ".4f")]
  lines += [f"  C {o['C']:.2e}: N* {o['N']:.3e}  D* {o['D']:.3e}  loss {o['loss']:.4f}"
            for o in r["optimal"]]
  if "frontier" in r:
    f = r["frontier"]
    lines.append(f"lowest-loss frontier ({f['runs']} runs): "
                 f"{target} = {f['k']:.4g} * C^{f['c']:.4f}")
  return "\n".join(lines)


def main(argv):
  del argv
  runs = read_runs(FLAGS.csv, target=FLAGS.target, n_column=FLAGS.n_column,
                   d_column=FLAGS.d_column, c_column=FLAGS.c_column,
                   drop_highest=FLAGS.drop_highest)
  budgets = [float(b) for b in FLAGS.budgets] or default_budgets(runs["C"])
  result = fit_table(runs, bootstrap=FLAGS.bootstrap, budgets=budgets, workers=FLAGS.workers)
  print(format_result(result, FLAGS.target))
  if FLAGS.json:
    print(json.dumps(result))
