"""Runs tables: the CSV that `nmm-scaling collect` writes and `fit` / `plot` read.

Columns: `N` (parameters that the compute counts: active ones for MoE), `N_total`, `D` (training
tokens), `C` (training FLOPs), `loss` and `loss/<source>` (final held-out losses), `run`. Other
tables work too: name their columns (`--n_column`, ...); without D, D = C / (6 N).
"""
import csv
import os

import numpy as np


def read_runs(path: str, *, target: str = "loss", n_column: str = "N", d_column: str = "D",
              c_column: str = "C", drop_highest: int = 0) -> dict:
  """{"N", "D", "C", "loss", "rows"} as arrays (rows: the CSV rows kept), sorted as in the file.

  `drop_highest` leaves out that many runs with the highest loss (outliers, e.g. diverged runs)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"runs table {path} does not exist")
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  if not rows:
    raise ValueError(f"{path} has no rows")
  columns = set(rows[0])
  for need in (n_column, target):
    if need not in columns:
      raise KeyError(f"{path} has no column {need!r} (columns: {sorted(columns)})")
  if d_column not in columns and c_column not in columns:
    raise KeyError(f"{path} needs a {d_column!r} or a {c_column!r} column "
                   f"(columns: {sorted(columns)})")
  rows = [r for r in rows if r[target] not in ("", "nan")]  # e.g. a run without that source

  def column(name, where):
    try:
      return np.array([float(r[name]) for r in where])
    except ValueError as e:
      raise ValueError(f"{path}: column {name!r}: {e}") from e

  loss = column(target, rows)
  if drop_highest:
    keep = np.sort(np.argsort(loss, kind="stable")[:len(rows) - drop_highest])
    rows, loss = [rows[i] for i in keep], loss[keep]
  N = column(n_column, rows)
  if d_column in columns:
    D = column(d_column, rows)
    C = column(c_column, rows) if c_column in columns else 6 * N * D
  else:
    C = column(c_column, rows)
    D = C / (6 * N)
  return {"N": N, "D": D, "C": C, "loss": loss, "rows": rows}


def write_runs(path: str, rows: list):
  """Writes dict rows; the column order puts N, N_total, D, C, loss first."""
  first = ["N", "N_total", "D", "C", "loss"]
  others = sorted({k for r in rows for k in r} - set(first) - {"run"})
  columns = [c for c in first if any(c in r for r in rows)] + others + ["run"]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
