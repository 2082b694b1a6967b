"""nmm-scaling compare: model families on one plot, with their fitted laws and intervals.

  nmm-scaling compare --family=early=runs_early.csv --family=late=runs_late.csv \
      [--family=moe=runs_moe.csv ...] --out=DIR [--target=loss] [--bootstrap=100] [--json]

Fits L = E + A / N^alpha + B / D^beta to each family's runs table (nmm-scaling fit's procedure)
and compares the families at equal compute: the compute-optimal loss L*(C) of each law at some
budgets, with 95% bootstrap intervals and its ratio to the best family's. Writes DIR/compare.png
(each family's runs, L*(C) and its bootstrap band) and prints the coefficients with intervals and
the comparison; with --json the last line is one JSON object with all of it (scaling/compare.py).
"""
import json
import os

from absl import flags

from nmm_jax.scaling import compare as compare_lib
from nmm_jax.scaling import plots

flags.DEFINE_multi_string("family", [], "NAME=PATH of a family's runs table (nmm-scaling "
                          "collect); once per family.")
flags.DEFINE_string("out", None, "Folder for compare.png.")
flags.DEFINE_string("target", "loss", "Loss column to fit and compare, e.g. loss/caption.")
flags.DEFINE_integer("bootstrap", 100, "Bootstrap refits per family for the intervals and "
                     "bands (0: none).")
flags.DEFINE_list("budgets", [], "FLOP budgets to compare L* at (default: the powers of ten "
                  "inside the compute range all families share, and the largest budget they all "
                  "ran at).")
flags.DEFINE_integer("workers", os.cpu_count() or 1, "Processes sharing the initialisation grid.")
flags.DEFINE_bool("json", False, "End with one line of JSON.")
flags.mark_flags_as_required(["out"])
FLAGS = flags.FLAGS


def _cell(value, interval, fmt) -> str:
  text = format(value, fmt)
  if interval is not None:
    text += f" [{format(interval[0], fmt)}, {format(interval[1], fmt)}]"
  return text


def _table(header, rows) -> list:
  widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
  return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
          for r in [header] + rows]


def format_comparison(r: dict, target: str) -> str:
  n = r["bootstrap"]
  lines = [f"{target} = E + A / N^alpha + B / D^beta per family"
           + (f" (95% intervals of {n} bootstrap refits)" if n else "")]
  coefficients = (("E", ".4g"), ("A", ".4g"), ("B", ".4g"), ("alpha", ".4f"), ("beta", ".4f"))
  rows = []
  for name, family in r["families"].items():
    ci = family["interval_95"] or {}
    rows.append([name, family["runs"]] + [_cell(family["law"][k], ci.get(k), fmt)
                                          for k, fmt in coefficients])
  lines += ["  " + line for line in _table(["family", "runs"] + [k for k, _ in coefficients],
                                           rows)]
  lines.append(f"compute-optimal {target} L*(C) = L(N*(C), D*(C)) at equal compute, and its "
               "ratio to the best family's")
  for budget in r["budgets"]:
    rows = []
    for name, row in budget["families"].items():
      ratio = ("best" if name == budget["best"]
               else _cell(row["ratio"], row["ratio_interval_95"], ".4f"))
      rows.append([name, _cell(row["loss"], row["interval_95"], ".4f"), ratio,
                   "extrapolated" if row["extrapolated"] else ""])
    lines.append(f"  C {budget['C']:.2e}  (best: {budget['best']})")
    lines += ["    " + line for line in _table(["family", "L*", "ratio", ""], rows)]
  return "\n".join(lines)


def _budget(text: str) -> float:
  try:
    return float(text)
  except ValueError:
    raise ValueError(f"--budgets: {text!r} is not a number of FLOPs (e.g. 1e21)") from None


def main(argv):
  del argv
  paths = compare_lib.parse_families(FLAGS.family)
  runs_by_family = compare_lib.read_families(paths, target=FLAGS.target)
  budgets = [_budget(b) for b in FLAGS.budgets] or None
  result = compare_lib.compare(runs_by_family, bootstrap=FLAGS.bootstrap, budgets=budgets,
                               workers=FLAGS.workers)
  os.makedirs(FLAGS.out, exist_ok=True)
  path = os.path.join(FLAGS.out, "compare.png")
  plots.compare_plot(runs_by_family, result, path, FLAGS.target)
  print(format_comparison(result, FLAGS.target))
  print(f"wrote {path}")
  if FLAGS.json:
    print(json.dumps({"target": FLAGS.target, "csv": paths, "png": path, **result}))
