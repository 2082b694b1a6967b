"""nmm-scaling compare: two families generated from known laws are fitted, ranked at equal compute
with the true ratio, and plotted; bad --family inputs end with one line naming the culprit."""
import json
import subprocess
import sys

import numpy as np
import pytest

from nmm_jax.scaling import compare
from nmm_jax.scaling.fit import ScalingLaw
from nmm_jax.scaling.table import write_runs

# Family "b" has the larger E and the smaller exponents: its loss is worse at every (N, D), so at
# every budget.
TRUTH = {"a": ScalingLaw(E=1.7, A=400.0, B=1500.0, alpha=0.30, beta=0.33),
         "b": ScalingLaw(E=1.9, A=400.0, B=1500.0, alpha=0.28, beta=0.30)}
# Overlapping sweeps: "a" over 1e18..1e21 FLOPs, "b" over 1e17..1e20; shared 1e18..1e20.
BUDGETS = {"a": [1e18, 1e19, 1e20, 1e21], "b": [1e17, 1e18, 1e19, 1e20]}
# Fixed seeds (data: 4 and 14; the bootstrap's: 0 and 1), so the test is deterministic.
SEEDS = {"a": 4, "b": 14}
NOISE = 3e-4
# The CLI as `python -m nmm_jax.scaling.cli` runs it, with a small initialisation grid around
# the truth: the paper's 4,500 starts take minutes per family on a busy CPU, and this file is about
# the comparison, not the search (tests/test_scaling_fit.py checks the search).
RUN_WITH_SMALL_GRID = """
import numpy as np
from nmm_jax.scaling import fit
fit.GRID = dict(a=np.array([0.0, 5.0]), b=np.array([0.0, 5.0]), e=np.array([0.0, 0.5]),
                alpha=np.array([0.5]), beta=np.array([0.5]))
from nmm_jax.scaling.cli.__main__ import run
run()
"""


def nmm_scaling_compare(*args):
  return subprocess.run([sys.executable, "-c", RUN_WITH_SMALL_GRID, "compare", *args],
                        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)


def _isoflop_rows(truth, budgets, seed: int, noise: float = NOISE) -> list:
  """Six model sizes at each budget (an isoFLOP sweep), D = C / 6N, losses from `truth` with
  relative noise; C carries the step-count rounding of a real sweep."""
  rng = np.random.default_rng(seed)
  C = np.repeat(budgets, 6) * (1 + rng.uniform(-1e-3, 1e-3, 6 * len(budgets)))
  N = np.concatenate([np.geomspace(c ** 0.5 / 30, c ** 0.5 / 3, 6) for c in C[::6]])
  D = C / (6 * N)
  L = truth.loss(N, D) * np.exp(rng.normal(0, noise, len(N)))
  return [{"N": n, "D": d, "C": c, "loss": loss, "run": f"C{c:.1e}_N{n:.2e}"}
          for n, d, c, loss in zip(N, D, C, L)]


def _tables(tmp_path) -> dict:
  paths = {}
  for name, truth in TRUTH.items():
    paths[name] = str(tmp_path / f"runs_{name}.csv")
    write_runs(paths[name], _isoflop_rows(truth, BUDGETS[name], SEEDS[name]))
  return paths


def test_two_known_families_fitted_ranked_and_plotted(tmp_path):
  paths = _tables(tmp_path)
  out = nmm_scaling_compare(f"--family=a={paths['a']}", f"--family=b={paths['b']}",
                            f"--out={tmp_path / 'plots'}", "--bootstrap=20", "--workers=1",
                            "--json")
  assert out.returncode == 0, out.stderr[-3000:]
  printed = out.stdout.strip().splitlines()
  result = json.loads(printed[-1])
  assert result["target"] == "loss" and result["csv"] == paths and result["bootstrap"] == 20
  for name, truth in TRUTH.items():
    family = result["families"][name]
    assert family["runs"] == 24
    for k in ("alpha", "beta"):
      assert family["law"][k] == pytest.approx(getattr(truth, k), abs=3e-3), (name, k)
      # The interval is about the truth: 20 refits make its ends noisy, and a 95% interval
      # misses 1 time in 20 by design, so it is allowed its own width of slack.
      low, high = family["interval_95"][k]
      slack = high - low
      assert 0 < slack < 0.05 and low - slack <= getattr(truth, k) <= high + slack, (name, k)
    assert family["law"]["E"] == pytest.approx(truth.E, rel=1e-2)
    # The band of the refits brackets the law's curve, on the common grid over both sweeps.
    curve = {k: np.asarray(v) for k, v in family["curve"].items()}
    assert len(curve["loss"]) == len(result["C"]) == 100
    assert np.all(curve["low"] <= curve["high"])
    assert np.mean((curve["low"] <= curve["loss"]) & (curve["loss"] <= curve["high"])) > 0.9
  assert result["C"][0] == pytest.approx(1e17, rel=2e-3)
  assert result["C"][-1] == pytest.approx(1e21, rel=2e-3)

  # Default budgets: the powers of ten both sweeps cover (budgets: C to 2 digits).
  assert [b["C"] for b in result["budgets"]] == [1e18, 1e19, 1e20]
  for budget in result["budgets"]:
    C = budget["C"]
    assert budget["best"] == "a"
    a, b = budget["families"]["a"], budget["families"]["b"]
    true_a, true_b = (compare.optimal_loss(TRUTH[n], C) for n in ("a", "b"))
    assert a["ratio"] == 1.0 and a["ratio_interval_95"] is None
    assert b["ratio"] == pytest.approx(true_b / true_a, rel=1e-3)
    assert 1 < b["ratio_interval_95"][0] <= b["ratio_interval_95"][1]
    assert a["interval_95"][0] <= a["loss"] <= a["interval_95"][1]
    assert a["loss"] == pytest.approx(true_a, rel=1e-3)
    assert not a["extrapolated"] and not b["extrapolated"]

  text = "\n".join(printed[:-1])
  assert "(95% intervals of 20 bootstrap refits)" in text
  assert "C 1.00e+19  (best: a)" in text and "wrote " in text
  with open(result["png"], "rb") as f:
    png = f.read()
  assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_default_budgets():
  def runs(*C):
    return {"C": np.array(C, float)}
  # Powers of ten inside the shared range, and the largest budget both ran at.
  assert compare.default_budgets({"x": runs(1e15, 3e16, 5e17), "y": runs(2e15, 3e16, 9e18)}) \
      == [1e16, 3e16, 1e17]
  # Ranges that do not overlap: the powers of ten over all the runs.
  assert compare.default_budgets({"x": runs(1e15, 2e15), "y": runs(1e17, 3e17)}) \
      == [1e15, 1e16, 1e17]


@pytest.mark.parametrize("family_flags, message", [
    (["--family=a"], "family 'a' is not NAME=PATH"),
    (["--family=a={a}", "--family=a={b}"], "family 'a' is given twice"),
    (["--family=a={a}", "--family=c={missing}"], "runs table {missing} does not exist"),
    (["--family=a={a}", "--family=few={few}"], "family 'few' ({few}) has 3 runs with loss: a fit "
     "needs at least 5"),
])
def test_bad_families_fail_in_one_line(tmp_path, family_flags, message):
  files = {"a": tmp_path / "a.csv", "b": tmp_path / "b.csv", "few": tmp_path / "few.csv",
           "missing": tmp_path / "missing.csv"}
  write_runs(str(files["a"]), _isoflop_rows(TRUTH["a"], [1e18], 0))
  write_runs(str(files["b"]), _isoflop_rows(TRUTH["b"], [1e18], 0))
  write_runs(str(files["few"]), _isoflop_rows(TRUTH["b"], [1e18], 0)[:3])
  out = nmm_scaling_compare(*(f.format(**files) for f in family_flags), f"--out={tmp_path}")
  assert out.returncode != 0
  assert "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("nmm-scaling compare: ") and message.format(**files) in last, last
