"""nmm-scaling fit: the Chinchilla approach-3 fit of a runs table.

  nmm-scaling fit --csv=runs.csv [--target=loss/caption] [--bootstrap=100] [--json]

Prints the coefficients with bootstrap intervals, the compute-optimal exponents a, b and
N*, D* at some budgets, the L(C) power law on the lowest-loss frontier, the law's errors on its
own runs (beside their seed-to-seed spread, when collect averaged seeds), and how well the law
predicts runs it was not fitted on (scaling/validation.py): the largest budget's runs from a fit
on the smaller budgets, and each run from a fit without it. With --json the last line is one
JSON object with all of it.
"""
import json
import os

import numpy as np
from absl import flags

from nmm_jax.scaling import fit as fit_lib
from nmm_jax.scaling import validation
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
flags.DEFINE_bool("extrapolate", True, "Fit on all but the largest budget and report the errors "
                  "on its runs.")
flags.DEFINE_bool("leave_one_out", True, "Refit without each run and report its error.")
flags.DEFINE_bool("json", False, "End with one line of JSON.")
flags.mark_flags_as_required(["csv"])
FLAGS = flags.FLAGS


def default_budgets(C) -> list:
  low, high = int(np.floor(np.log10(C.min()))), int(np.ceil(np.log10(C.max()))) + 1
  return [float(10 ** k) for k in range(low, high + 1)]


def entropy_floor(runs, target: str):
  """The data's entropy floor for `target` ("loss" -> the "floor" column that `collect` writes
  for the embedded world data), the mean over the runs; None without that column."""
  column = target.replace("loss", "floor", 1)
  values = [float(r[column]) for r in runs.get("rows", ())
            if r.get(column) not in (None, "", "nan")]
  return float(np.mean(values)) if values else None


def seed_noise(runs, target: str):
  """The runs' own noise, when `collect` averaged seeds: the mean over those rows of
  loss_sd / loss (the spread of one run, relative); None otherwise (or for a per-source
  target, whose spread collect does not record)."""
  if target != "loss":
    return None
  values = [float(r["loss_sd"]) / float(r["loss"]) for r in runs.get("rows", ())
            if r.get("loss_sd") not in (None, "", "nan")]
  return float(np.mean(values)) if values else None


def fit_table(runs, *, bootstrap: int, budgets, workers: int, extrapolate: bool = True,
              leave_one_out: bool = True, grid=None, target: str = "loss") -> dict:
  """Everything `fit` reports, as one dict (`grid`: fit.GRID unless given). A check the table is
  too small for is reported as {"skipped": why}, not an error: the fit itself still stands."""
  law, objective = fit_lib.fit(runs["N"], runs["D"], runs["loss"], workers=workers, grid=grid)
  result = {**law.as_dict(), "objective": objective, "runs": int(len(runs["N"]))}
  # How far the law is from the runs it was fitted on: beside the runs' seed-to-seed spread,
  # it says whether the form or the noise limits the predictions.
  errors = np.abs(law.loss(runs["N"], runs["D"]) / runs["loss"] - 1)
  result["residuals"] = {"mean_abs_error": float(errors.mean()),
                         "max_abs_error": float(errors.max())}
  noise = seed_noise(runs, target)
  if noise is not None:
    result["residuals"]["seed_sd"] = noise
  floor = entropy_floor(runs, target)
  if floor is not None:
    result["entropy_floor"] = floor
  if bootstrap:
    result["interval_95"] = fit_lib.bootstrap(runs["N"], runs["D"], runs["loss"], law,
                                              samples=bootstrap)
  checks = {"extrapolation": (extrapolate, lambda: validation.extrapolation(
                runs["N"], runs["D"], runs["C"], runs["loss"], workers=workers, grid=grid)),
            "leave_one_out": (leave_one_out, lambda: validation.leave_one_out(
                runs["N"], runs["D"], runs["loss"], law))}
  for name, (wanted, check) in checks.items():
    if wanted:
      try:
        result[name] = check()
      except ValueError as e:
        result[name] = {"skipped": str(e)}
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
  if "entropy_floor" in r:
    lines.append(f"  the data's entropy floor {r['entropy_floor']:.4f} (no model does better; "
                 f"E estimates it)")
  lines += [f"  C {o['C']:.2e}: N* {o['N']:.3e}  D* {o['D']:.3e}  loss {o['loss']:.4f}"
            for o in r["optimal"]]
  if "frontier" in r:
    f = r["frontier"]
    lines.append(f"lowest-loss frontier ({f['runs']} runs): "
                 f"{target} = {f['k']:.4g} * C^{f['c']:.4f}")
  lines += _validation_lines(r)
  return "\n".join(lines)


def _validation_lines(r: dict) -> list:
  lines = []
  res = r.get("residuals")
  if res:
    lines.append(f"fitted runs: mean |error| {100 * res['mean_abs_error']:.2f}%, max "
                 f"{100 * res['max_abs_error']:.2f}%" + (
                     f" (one run's seed-to-seed spread: {100 * res['seed_sd']:.2f}%)"
                     if "seed_sd" in res else ""))
  x = r.get("extrapolation")
  if x and "skipped" in x:
    lines.append(f"held-out extrapolation: skipped ({x['skipped']})")
  elif x:
    lines.append(f"held-out extrapolation: fitted on the {x['fit_runs']} runs below "
                 f"{x['budget']:.2g} FLOPs (alpha {x['law']['alpha']:.4f}, beta "
                 f"{x['law']['beta']:.4f}), predicting the {len(x['runs'])} runs at it: "
                 f"max |error| {100 * x['max_abs_error']:.2f}%")
    lines += [f"  N {run['N']:.3e}  D {run['D']:.3e}  loss {run['loss']:.4f}  predicted "
              f"{run['predicted']:.4f}  ({100 * run['error']:+.2f}%)" for run in x["runs"]]
  o = r.get("leave_one_out")
  if o and "skipped" in o:
    lines.append(f"leave-one-out: skipped ({o['skipped']})")
  elif o:
    lines.append(f"leave-one-out: mean |error| {100 * o['mean_abs_error']:.2f}%, max "
                 f"{100 * o['max_abs_error']:.2f}% over {len(o['errors'])} runs")
  return lines


def main(argv):
  del argv
  runs = read_runs(FLAGS.csv, target=FLAGS.target, n_column=FLAGS.n_column,
                   d_column=FLAGS.d_column, c_column=FLAGS.c_column,
                   drop_highest=FLAGS.drop_highest)
  budgets = [float(b) for b in FLAGS.budgets] or default_budgets(runs["C"])
  result = fit_table(runs, bootstrap=FLAGS.bootstrap, budgets=budgets, workers=FLAGS.workers,
                     extrapolate=FLAGS.extrapolate, leave_one_out=FLAGS.leave_one_out,
                     target=FLAGS.target)
  print(format_result(result, FLAGS.target))
  if FLAGS.json:
    print(json.dumps(result))
