"""Scaling plots (PNG): isoFLOP curves with their minima, the compute-optimal frontier, loss vs
compute with the fitted power law, and the same per data source."""
import collections

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nmm_jax.scaling import fit as fit_lib  # noqa: E402


def budget_groups(runs) -> dict:
  """{budget: run indices}: the sweep's `budget` column, else C rounded to 2 digits."""
  groups = collections.defaultdict(list)
  for i, row in enumerate(runs["rows"]):
    budget = float(row["budget"]) if row.get("budget") not in (None, "", "0", "0.0") else None
    groups[budget or float(f"{runs['C'][i]:.2g}")].append(i)
  return dict(sorted(groups.items()))


def isoflop_minimum(N, L):
  """N at the minimum of a parabola in log N through (N, L), or None without one inside the
  sampled range (then the sweep did not bracket the optimum)."""
  if len(set(N)) < 3:
    return None
  c2, c1, _ = np.polyfit(np.log(N), L, 2)
  if c2 <= 0:
    return None
  log_n = -c1 / (2 * c2)
  if not np.log(min(N)) <= log_n <= np.log(max(N)):
    return None
  return float(np.exp(log_n))


def _finish(ax, title, xlabel, ylabel, path):
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  ax.figure.tight_layout()
  ax.figure.savefig(path, dpi=120)
  plt.close(ax.figure)


def isoflop_plot(runs, law, path, target="loss") -> dict:
  """Loss vs N at each budget, the law's curve at that budget, the minima; returns
  {budget: N at the minimum} for the groups that bracket one."""
  fig, ax = plt.subplots(figsize=(7, 5))
  colours = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(budget_groups(runs)))))
  minima = {}
  for colour, (budget, idx) in zip(colours, budget_groups(runs).items()):
    N, L = runs["N"][idx], runs["loss"][idx]
    order = np.argsort(N)
    ax.plot(N[order], L[order], "o-", color=colour, label=f"C = {budget:.2g}")
    if law is not None:
      n_grid = np.geomspace(N.min() / 2, N.max() * 2, 100)
      ax.plot(n_grid, law.loss(n_grid, budget / (6 * n_grid)), "--", color=colour, alpha=0.6)
    n_min = isoflop_minimum(N, L)
    if n_min is not None:
      minima[budget] = n_min
      c2, c1, c0 = np.polyfit(np.log(N), L, 2)
      ax.plot(n_min, c2 * np.log(n_min) ** 2 + c1 * np.log(n_min) + c0, "*", color=colour,
              markersize=14, markeredgecolor="black")
  ax.set_xscale("log")
  note = " (dashed: fitted law; stars: isoFLOP minima)" if law is not None else ""
  _finish(ax, f"isoFLOP curves{note}", "parameters N", f"held-out {target}", path)
  return minima


def frontier_plot(runs, law, minima: dict, path):
  """Compute-optimal N*(C): the isoFLOP minima and the law's prediction."""
  fig, ax = plt.subplots(figsize=(7, 5))
  C = np.geomspace(runs["C"].min() / 3, runs["C"].max() * 10, 100)
  if law is not None:
    ax.plot(C, law.optimal(C)[0], "-", label=f"fitted law: N* ~ C^{law.a:.3f}")
  if minima:
    ax.plot(list(minima), list(minima.values()), "*", markersize=14, label="isoFLOP minima")
  ax.plot(runs["C"], runs["N"], ".", color="grey", alpha=0.6, label="runs")
  ax.set_xscale("log")
  ax.set_yscale("log")
  _finish(ax, "compute-optimal model size", "training FLOPs C", "parameters N", path)


def loss_vs_compute_plot(runs, path, target="loss"):
  """Every run's loss vs C, the lowest-loss frontier and its power law."""
  fig, ax = plt.subplots(figsize=(7, 5))
  scatter = ax.scatter(runs["C"], runs["loss"], c=np.log10(runs["N"]), cmap="viridis", s=30)
  fig.colorbar(scatter, ax=ax, label="log10 N")
  frontier = fit_lib.compute_frontier(runs["C"], runs["loss"])
  if len(frontier) >= 2:
    k, c = fit_lib.fit_power_law(runs["C"][frontier], runs["loss"][frontier])
    C = np.geomspace(runs["C"].min(), runs["C"].max() * 3, 100)
    ax.plot(C, k * C ** c, "r-", label=f"frontier fit: {k:.3g} C^{c:.3f}")
  ax.plot(runs["C"][frontier], runs["loss"][frontier], "r*", markersize=12,
          label="lowest-loss frontier")
  ax.set_xscale("log")
  ax.set_yscale("log")
  _finish(ax, f"held-out {target} vs compute", "training FLOPs C", target, path)


def per_source_plot(runs_by_source: dict, path):
  """One panel per loss column: loss vs C with its frontier power law."""
  fig, axes = plt.subplots(1, len(runs_by_source), figsize=(5 * len(runs_by_source), 4.5),
                           squeeze=False)
  for ax, (target, runs) in zip(axes[0], runs_by_source.items()):
    ax.scatter(runs["C"], runs["loss"], c=np.log10(runs["N"]), cmap="viridis", s=25)
    frontier = fit_lib.compute_frontier(runs["C"], runs["loss"])
    if len(frontier) >= 2:
      k, c = fit_lib.fit_power_law(runs["C"][frontier], runs["loss"][frontier])
      C = np.geomspace(runs["C"].min(), runs["C"].max() * 3, 100)
      ax.plot(C, k * C ** c, "r-", label=f"{k:.3g} C^{c:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title(target)
    ax.set_xlabel("training FLOPs C")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  axes[0][0].set_ylabel("held-out loss")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def compare_plot(runs_by_family: dict, comparison: dict, path, target="loss"):
  """Families on one plot (compare.compare): each family's runs (loss vs C), the compute-optimal
  loss L*(C) of its fitted law (solid over its own runs' compute, dashed where extrapolated) and
  the band of its bootstrap refits; the legend gives alpha and beta with their intervals."""
  fig, ax = plt.subplots(figsize=(8, 5.5))
  C = np.asarray(comparison["C"])
  colours = plt.cm.tab10(np.arange(len(runs_by_family)) % 10)
  for colour, (name, runs) in zip(colours, runs_by_family.items()):
    family = comparison["families"][name]
    law, ci, curve = family["law"], family["interval_95"], family["curve"]
    label = f"{name} ({family['runs']} runs): alpha {law['alpha']:.3f}"
    label += f" [{ci['alpha'][0]:.3f}, {ci['alpha'][1]:.3f}]" if ci else ""
    label += f", beta {law['beta']:.3f}"
    label += f" [{ci['beta'][0]:.3f}, {ci['beta'][1]:.3f}]" if ci else ""
    ax.plot(runs["C"], runs["loss"], "o", color=colour, alpha=0.5, markersize=4)
    loss = np.asarray(curve["loss"])
    low, high = family["C_range"]
    inside = (C >= low) & (C <= high)
    ax.plot(C, np.where(inside, loss, np.nan), "-", color=colour, label=label)
    ax.plot(C, loss, "--", color=colour, alpha=0.7)  # under the solid part: joins it, no gap
    if curve["low"] is not None:
      ax.fill_between(C, curve["low"], curve["high"], color=colour, alpha=0.2, linewidth=0)
  for budget in comparison["budgets"]:
    ax.axvline(budget["C"], color="grey", linestyle=":", linewidth=1)
  ax.set_xscale("log")
  ax.set_yscale("log")
  band = (f"; bands: 95% of {comparison['bootstrap']} bootstrap refits"
          if comparison["bootstrap"] else "")
  _finish(ax, f"compute-optimal {target} L*(C) per family{band}\n(points: runs; dashed: "
          "extrapolated; dotted: compared budgets)", "training FLOPs C", f"held-out {target}",
          path)
