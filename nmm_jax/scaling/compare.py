"""Model families (early vs late fusion vs MoE, ...) compared through their fitted scaling laws.

Each family's runs table is fitted on its own (fit.fit) and bootstrapped (fit.bootstrap). The
families are then compared where a scaling law answers the question "which is better": at equal
compute, through the compute-optimal loss L*(C) = L(N*(C), D*(C)) of each family's law, with 95%
intervals from the bootstrap refits. `nmm-scaling compare` (cli/compare.py) prints and plots it.
"""
import numpy as np

from nmm_jax.scaling import fit as fit_lib
from nmm_jax.scaling.table import read_runs

MIN_RUNS = 5  # fit.fit's minimum


def parse_families(specs) -> dict:
  """{name: path} of "NAME=PATH" strings (the --family flag), in the order given."""
  families = {}
  for spec in specs:
    name, sep, path = spec.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
      raise ValueError(f"family {spec!r} is not NAME=PATH (e.g. early=runs_early.csv)")
    if name in families:
      raise ValueError(f"family {name!r} is given twice ({families[name]} and {path})")
    families[name] = path
  if not families:
    raise ValueError("no family given: --family=NAME=PATH, once per family")
  return families


def read_families(paths: dict, *, target: str = "loss") -> dict:
  """{name: runs (table.read_runs)} of {name: path}; a family too small to fit is an error
  naming it, raised before any fit starts (a fit of every other family would be wasted)."""
  runs_by_family = {name: read_runs(path, target=target) for name, path in paths.items()}
  for name, runs in runs_by_family.items():
    if len(runs["N"]) < MIN_RUNS:
      raise ValueError(f"family {name!r} ({paths[name]}) has {len(runs['N'])} runs with "
                       f"{target}: a fit needs at least {MIN_RUNS}")
  return runs_by_family


def default_budgets(runs_by_family: dict) -> list:
  """Budgets every family's runs speak for: the powers of ten inside the common compute range
  (the largest of the families' smallest C to the smallest of their largest), and the largest
  budget (`fit.budget_of`) that every family ran at. Without either (ranges that do not overlap):
  the powers of ten over all the runs, where some family's L* is an extrapolation."""
  lows, highs = zip(*(_budget_range(runs) for runs in runs_by_family.values()))
  budgets = set(_powers_of_ten(max(lows), min(highs)))
  shared = set.intersection(*(set(fit_lib.budget_of(runs["C"]).tolist())
                              for runs in runs_by_family.values()))
  if shared:
    budgets.add(max(shared))
  return sorted(budgets) or _powers_of_ten(min(lows), max(highs)) or [float(max(highs))]


def _budget_range(runs) -> tuple:
  """The smallest and largest budget (`fit.budget_of`: C to 2 digits) of a family's runs: a sweep
  at 1e18 FLOPs whose runs are at 0.9995e18 has run at 1e18."""
  budgets = fit_lib.budget_of(runs["C"])
  return float(budgets.min()), float(budgets.max())


def _powers_of_ten(low: float, high: float) -> list:
  if low > high:
    return []
  return [float(10 ** k) for k in range(int(np.ceil(np.log10(low))),
                                        int(np.floor(np.log10(high))) + 1)]


def optimal_loss(law: fit_lib.ScalingLaw, C) -> np.ndarray:
  """L*(C): the law's loss at its compute-optimal N*, D* for compute C."""
  return np.asarray(law.loss(*law.optimal(C)), float)


def compare(runs_by_family: dict, *, bootstrap: int = 100, budgets=None, workers: int = 1,
            grid=None, points: int = 100, level: float = 0.95, seed: int = 0) -> dict:
  """The comparison as one JSON-ready dict:

    families: {name: {runs, C_range, objective, law (fit.ScalingLaw.as_dict), interval_95
              ({coefficient: (low, high)}, None without bootstrap), curve {loss, low, high}}}
    C: the common grid of `points` budgets (log-spaced over the union of the compute ranges)
       that every family's curve (L* of its law, and the band of its refits) is given on
    budgets: [{C, best, families: {name: {loss, interval_95, ratio, ratio_interval_95,
              extrapolated}}}] at each of `budgets` (default_budgets unless given)

  `ratio` is L* over the best family's L* at that budget (1 for the best). Its interval pairs
  the i-th refits of the two families: their bootstraps are independent (one seed per family),
  so the pairs sample the ratio's distribution. `level` sets the intervals (0.95: the keys keep
  the name). `grid`: the initialisation grid of the full fits (fit.GRID unless given).
  """
  if not runs_by_family:
    raise ValueError("no family to compare")
  tail = 100 * (1 - level) / 2
  C_all = np.concatenate([runs["C"] for runs in runs_by_family.values()])
  C_grid = np.geomspace(C_all.min(), C_all.max(), points)
  budgets = [float(b) for b in (default_budgets(runs_by_family) if budgets is None else budgets)]
  families, refit_losses, point_losses = {}, {}, {}
  for index, (name, runs) in enumerate(runs_by_family.items()):
    law, objective = fit_lib.fit(runs["N"], runs["D"], runs["loss"], workers=workers, grid=grid)
    family = {"runs": int(len(runs["N"])),
              "C_range": [float(runs["C"].min()), float(runs["C"].max())],
              "objective": objective, "law": law.as_dict(), "interval_95": None,
              "curve": {"loss": optimal_loss(law, C_grid).tolist(), "low": None, "high": None}}
    point_losses[name] = optimal_loss(law, budgets)
    if bootstrap:
      intervals, laws = fit_lib.bootstrap(runs["N"], runs["D"], runs["loss"], law,
                                          samples=bootstrap, seed=seed + index, level=level,
                                          return_laws=True)
      family["interval_95"] = intervals
      curves = np.stack([optimal_loss(refit, C_grid) for refit in laws])
      family["curve"]["low"] = np.percentile(curves, tail, axis=0).tolist()
      family["curve"]["high"] = np.percentile(curves, 100 - tail, axis=0).tolist()
      refit_losses[name] = np.stack([optimal_loss(refit, budgets) for refit in laws])
    families[name] = family

  at_budgets = []
  for j, C in enumerate(budgets):
    best = min(point_losses, key=lambda name: point_losses[name][j])
    entry = {"C": C, "best": best, "families": {}}
    for name, family in families.items():
      low, high = _budget_range(runs_by_family[name])
      row = {"loss": float(point_losses[name][j]),
             "ratio": float(point_losses[name][j] / point_losses[best][j]),
             "interval_95": None, "ratio_interval_95": None,
             # Outside the family's own budgets, its L* is the law's extrapolation.
             "extrapolated": not low <= C <= high}
      if name in refit_losses:
        refits = refit_losses[name][:, j]
        row["interval_95"] = _interval(refits, tail)
        if name != best:
          row["ratio_interval_95"] = _interval(refits / refit_losses[best][:, j], tail)
      entry["families"][name] = row
    at_budgets.append(entry)
  return {"families": families, "C": C_grid.tolist(), "budgets": at_budgets,
          "bootstrap": int(bootstrap)}


def _interval(values, tail: float) -> list:
  return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]
