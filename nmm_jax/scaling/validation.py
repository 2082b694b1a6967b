"""How well a fitted law predicts runs it was not fitted on: held-out extrapolation (fit on every
budget but the largest, predict the largest's runs: the question a scaling law is asked) and
leave-one-out (refit without each run, predict it). Errors are relative: predicted / measured - 1.
"""
import numpy as np

from nmm_jax.scaling import fit as fit_lib

MIN_FIT_RUNS = 5  # fit.fit's minimum


def extrapolation(N, D, C, L, *, workers: int = 1, grid=None) -> dict:
  """The law fitted (whole initialisation grid) on the runs below the largest budget
  (`fit.budget_of`), and its errors on the runs of the largest."""
  N, D, C, L = (np.asarray(x, float) for x in (N, D, C, L))
  budgets = fit_lib.budget_of(C)
  held = budgets == budgets.max()
  if held.all():
    raise ValueError("every run has the same compute budget: nothing to extrapolate to")
  if (~held).sum() < MIN_FIT_RUNS:
    raise ValueError(f"only {(~held).sum()} runs below the largest budget "
                     f"({budgets.max():.2g} FLOPs); the fit needs {MIN_FIT_RUNS}")
  law, _ = fit_lib.fit(N[~held], D[~held], L[~held], workers=workers, grid=grid)
  predicted = law.loss(N[held], D[held])
  errors = predicted / L[held] - 1
  return {"budget": float(budgets.max()), "fit_runs": int((~held).sum()), "law": law.as_dict(),
          "runs": [{"N": float(n), "D": float(d), "loss": float(l), "predicted": float(p),
                    "error": float(e)}
                   for n, d, l, p, e in zip(N[held], D[held], L[held], predicted, errors)],
          "max_abs_error": float(np.abs(errors).max())}


def leave_one_out(N, D, L, law: fit_lib.ScalingLaw) -> dict:
  """Each run predicted by a refit without it (started from `law`, the fit on all runs)."""
  N, D, L = (np.asarray(x, float) for x in (N, D, L))
  if len(N) <= MIN_FIT_RUNS:
    raise ValueError(f"leave-one-out needs more than {MIN_FIT_RUNS} runs, got {len(N)}")
  errors, starts = [], fit_lib.nearby_starts(law)
  for i in range(len(N)):
    keep = np.arange(len(N)) != i
    refit, _ = fit_lib.fit(N[keep], D[keep], L[keep], starts=starts)
    errors.append(float(refit.loss(N[i], D[i]) / L[i] - 1))
  errors = np.asarray(errors)
  return {"errors": errors.tolist(), "mean_abs_error": float(np.abs(errors).mean()),
          "max_abs_error": float(np.abs(errors).max())}
