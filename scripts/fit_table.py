r"""The fit tables of README.md and docs/models.md: every configs/paper.py member and the
configs/large.py ones, compiled by nmm-compile's functions for v5p-64, v6e-256 and h100-8.

  .venv/bin/python scripts/fit_table.py [--out=docs/fit_table.jsonl] [--topologies=v5p-64,h100-8]
  .venv/bin/python scripts/fit_table.py --render   # the Markdown table of docs/fit_table.jsonl
  .venv/bin/python scripts/fit_table.py --render --write_docs   # ... into README.md, models.md

Each cell compiles the train step at the paper's batch (256 sequences over the chips) and then
searches the largest per-chip batch (--search: report.max_per_chip_batch's bisection, or a
three-compile estimate that the table marks "≥"). Compiled with the flag preset a run uses
(train.xla_flags=auto). Rows are appended to --out as they finish, so an interrupted run
continues where it stopped; docs/fit_table.jsonl holds the rows behind the README's table;
--redo compiles cells again (e.g. --search=none cells, which have no max/chip yet), and the last
row of a cell wins. Without --redo, cells whose row is not current (from before the activation
layout, or of a config whose parameter count has changed since: marked † in the table) are
compiled again, and a current row that lacks a max/chip keeps its compile at the paper's batch
and gets the search only. The mesh shards parameters over as many chips
as divide d_model (fsdp = gcd(chips, d_model)) and data-parallelises the rest.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
from nmm_jax import xla_flags  # noqa: E402

xla_flags.apply("auto")  # before any backend starts, as nmm-train and nmm-compile do
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

from absl import app, flags  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
_OUT = flags.DEFINE_string("out", os.path.join(ROOT, "docs", "fit_table.jsonl"),
                           "Rows, one JSON object per cell.")
_TOPOLOGIES = flags.DEFINE_list("topologies", ["v5p-64", "v6e-256", "h100-8"], "Targets.")
_SPECS = flags.DEFINE_list("specs", None, "FILE:MEMBER cells (default: every member).")
_SEARCH = flags.DEFINE_enum("search", "exact", ["exact", "estimate", "none"],
                            "How the largest per-chip batch is found: exact (bisection to the "
                            "last batch), estimate (three or more compiles: the affine "
                            "prediction from two, then the prediction itself, predicted again "
                            "from each failure until it fits: a lower bound, a batch that fits), "
                            "none.")
_RENDER = flags.DEFINE_bool("render", False, "Print the Markdown table of --out and exit.")
_REDO = flags.DEFINE_bool("redo", False, "Compile cells that --out already has, again.")
_WRITE_DOCS = flags.DEFINE_bool("write_docs", False, "With --render: replace the table in "
                                "README.md and docs/models.md instead of printing it.")
DOCS = ("README.md", os.path.join("docs", "models.md"))

PAPER_BATCH = 256


def _family(name):
  """(SPECS, REFERENCE_PARAMS, get_config) of configs/NAME.py."""
  from nmm_jax.scaling.param_table import load_family
  return load_family(os.path.join(ROOT, "configs", f"{name}.py"))


def all_specs():
  return [f"{f}:{m}" for f in ("paper", "large") for m in _family(f)[0]]


def config_for(spec, chips):
  name, _, member = spec.partition(":")
  config = _family(name)[2](member)
  fsdp = math.gcd(chips, config.model.d_model)
  config.mesh.update(data=chips // fsdp, fsdp=fsdp, tensor=1, expert=1)
  return config


def _rows(path):
  """{(spec, topology): the cell's last row}."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return {(r["spec"], r["topology"]): r for r in map(json.loads, filter(str.strip, f))}


def current(row) -> bool:
  """Whether a row was compiled with the current code for the config as it is now: dated (rows
  from before the activation layout are not), and of the parameter count the config has now
  (the late models' ViT got heads of 64 after their first rows)."""
  from nmm_jax.scaling import flops
  config = config_for(row["spec"], row["chips"])
  return bool(row.get("compiled")) and row.get("params") == flops.param_counts(
      config.model)["total"]


def _complete(row, search):
  """Whether a cell's row needs no more compiles: current, and with a max/chip unless none is
  searched."""
  return bool(row) and current(row) and (search == "none" or "max_per_chip_batch" in row)


def measure(spec, target, search, previous=None):
  """The cell's row. `previous`: a current row without a max/chip, whose compile at the paper's
  batch the search starts from instead of compiling it again."""
  from nmm_jax.compile import report
  chips = len(target.devices)
  config = config_for(spec, chips)
  per_chip = max(1, PAPER_BATCH // chips)
  if previous:
    row = dict(previous)
    at_paper = {"peak_bytes": row["paper_peak_bytes"], "fits": row["paper_fits"]}
  else:
    at_paper = report.compile_step(config, target, per_chip)
    row = {"spec": spec, "topology": target.name, "chips": chips, "mesh": at_paper["mesh"],
           "paper_per_chip_batch": per_chip, "paper_peak_bytes": at_paper["peak_bytes"],
           "paper_fits": at_paper["fits"], "hbm_bytes": target.hbm_bytes,
           "compile_s": at_paper["compile_s"], "params": at_paper["params"],
           "compiled": datetime.date.today().isoformat()}
  if search != "none":
    best, r = report.max_per_chip_batch(config, target, known={per_chip: at_paper},
                                        log=lambda s: print(s, flush=True),
                                        exact=search == "exact")
    row.update(max_per_chip_batch=best, max_peak_bytes=r["peak_bytes"] if best else None,
               max_compiled=datetime.date.today().isoformat())
    if search == "estimate":
      row["max_search"] = "estimate"
  return row


def write_docs(table_lines):
  """Replaces the table (from its header line to the first line that is not a table row) in
  each of DOCS."""
  for name in DOCS:
    path = os.path.join(ROOT, name)
    with open(path) as f:
      lines = f.read().split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith("| config | h100-8")), None)
    if start is None:
      raise SystemExit(f"{name}: no fit table (a line starting '| config | h100-8') to replace")
    end = next(i for i in range(start, len(lines) + 1)
               if i == len(lines) or not lines[i].startswith("|"))
    with open(path, "w") as f:
      f.write("\n".join(lines[:start] + table_lines + lines[end:]))
    print(f"{name}: table of {len(table_lines) - 2} rows written")


def render(path):
  """One row per config; per topology: fits at batch 256 (and the per-chip peak there), the
  largest per-chip batch (and its peak), the compile time of one step. Returns the lines."""
  rows = _rows(path)
  topologies = list(dict.fromkeys(t for _, t in rows))
  header = ["config"]
  for t in topologies:
    chips = next(r["chips"] for (_, tt), r in rows.items() if tt == t)
    header += [f"{t}: batch 256 ({256 // chips if chips <= 256 else 1}/chip)",
               f"{t}: max/chip", f"{t}: compile"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for spec in all_specs():
    cells = [spec.split(":")[1]]
    for t in topologies:
      r = rows.get((spec, t))
      if r is None:
        cells += ["not compiled yet", "", ""]
        continue
      # † marks rows that are not current: from before the current layout, or of a model
      # that has changed since.
      old = "" if current(r) else " †"
      cells.append(f"{'fits' if r['paper_fits'] else '**no**'}, "
                   f"{r['paper_peak_bytes'] / 2 ** 30:.1f} GiB{old}")
      best = r.get("max_per_chip_batch")
      mark = "≥" if r.get("max_search") == "estimate" else ""
      cells.append("" if best is None else
                   f"{mark}{best}, {r['max_peak_bytes'] / 2 ** 30:.1f} GiB" if best else "0")
      cells.append(f"{r['compile_s']:.0f} s")
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def main(argv):
  del argv
  if _RENDER.value:
    lines = render(_OUT.value)
    if _WRITE_DOCS.value:
      write_docs(lines)
    else:
      print("\n".join(lines))
    return
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from nmm_jax.compile import topologies
  rows = {} if _REDO.value else _rows(_OUT.value)
  for name in _TOPOLOGIES.value:
    target = topologies.target(name)
    for spec in _SPECS.value or all_specs():
      row = rows.get((spec, name), {})
      if _complete(row, _SEARCH.value):
        continue
      print(f"{spec} on {name}", flush=True)
      row = measure(spec, target, _SEARCH.value, previous=row if row and current(row) else None)
      print(json.dumps(row), flush=True)
      with open(_OUT.value, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  app.run(main)
