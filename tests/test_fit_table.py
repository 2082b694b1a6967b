"""scripts/fit_table.py: the README's and docs/models.md's fit tables are its rendering of
docs/fit_table.jsonl, and a cell whose model has changed since its compile is marked stale."""
import json
import os
import subprocess
import sys

from nmm_jax.scaling import flops
from nmm_jax.scaling.param_table import load_family

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _render(rows_path):
  out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "fit_table.py"), "--render",
                        f"--out={rows_path}"], capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.splitlines()


def _table_in(path):
  with open(path) as f:
    lines = f.read().splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("| config | h100-8"))
  end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
  return lines[start:end]


def test_docs_tables_are_the_rendered_rows_and_stale_cells_are_marked(tmp_path):
  rendered = _render(os.path.join(ROOT, "docs", "fit_table.jsonl"))
  assert _table_in(os.path.join(ROOT, "README.md")) == rendered
  assert _table_in(os.path.join(ROOT, "docs", "models.md")) == rendered

  # One current cell, one compiled for another model (its parameter count differs), one from
  # before the activation layout (undated).
  get_config = load_family(os.path.join(ROOT, "configs", "paper.py"))[2]
  params = flops.param_counts(get_config("late-275m").model)["total"]
  row = {"spec": "paper:late-275m", "topology": "h100-8", "chips": 8, "compiled": "2026-12-05",
         "params": params, "paper_fits": True, "paper_peak_bytes": 2 ** 33, "compile_s": 10.0,
         "max_per_chip_batch": 40, "max_peak_bytes": 2 ** 36, "max_search": "estimate"}
  changed = dict(row, topology="v5p-64", chips=64, params=params - 1)
  undated = {k: v for k, v in dict(row, topology="v6e-256", chips=256).items() if k != "compiled"}
  path = tmp_path / "rows.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in (row, changed, undated)) + "\n")
  late = next(line for line in _render(path) if line.startswith("| late-275m"))
  cells = [c.strip() for c in late.split("|")[1:-1]]
  assert cells[1:4] == ["fits, 8.0 GiB", "≥40, 64.0 GiB", "10 s"]
  assert cells[4] == cells[7] == "fits, 8.0 GiB †"
