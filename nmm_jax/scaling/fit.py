"""Fitting L(N, D) = E + A / N^alpha + B / D^beta the way Chinchilla's "approach 3" does
(Hoffmann et al. 2022, Appendix D.2; the NMM paper's Appendix C):

  minimise  sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i )

over (a, b, e, alpha, beta) with A = exp(a), B = exp(b), E = exp(e), delta = 1e-3, by L-BFGS from
every point of a grid of initialisations, keeping the best (screened: a few iterations from every
start, then the best few to convergence). Confidence intervals come from
bootstrap refits; compute-optimal allocation follows from the fitted law with C = 6 N D.
"""
import concurrent.futures
import dataclasses
import itertools
import multiprocessing
import os

import numpy as np
from scipy.optimize import minimize

HUBER_DELTA = 1e-3
# The paper's grid: alpha, beta in 0..2 step .5; e in -1..1 step .5; a, b in 0..25 step 5.
GRID = dict(a=np.arange(0, 30, 5.0), b=np.arange(0, 30, 5.0), e=np.arange(-1, 1.5, 0.5),
            alpha=np.arange(0, 2.5, 0.5), beta=np.arange(0, 2.5, 0.5))
SCREEN_ITERATIONS = 10  # L-BFGS iterations from each start before the best few are polished
_ORDER = ("a", "b", "e", "alpha", "beta")
_BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclasses.dataclass(frozen=True)
class ScalingLaw:
  E: float
  A: float
  B: float
  alpha: float
  beta: float

  def loss(self, N, D):
    return self.E + self.A / np.power(N, self.alpha) + self.B / np.power(D, self.beta)

  @property
  def a(self) -> float:
    """N* grows as C^a."""
    return self.beta / (self.alpha + self.beta)

  @property
  def b(self) -> float:
    """D* grows as C^b."""
    return self.alpha / (self.alpha + self.beta)

  def optimal(self, C):
    """(N*, D*) minimising the loss at compute C = 6 N D."""
    G = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
    C = np.asarray(C, float)
    N = G * np.power(C / 6, self.a)
    return N, C / 6 / N

  def as_dict(self) -> dict:
    return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta,
            "a": self.a, "b": self.b}


def _objective(theta, log_N, log_D, log_L, delta):
  """Huber loss and its gradient in theta = (a, b, e, alpha, beta)."""
  a, b, e, alpha, beta = theta
  term_N, term_D = a - alpha * log_N, b - beta * log_D
  top = np.maximum(np.maximum(term_N, term_D), e)
  exp_N, exp_D, exp_e = np.exp(term_N - top), np.exp(term_D - top), np.exp(e - top)
  total = exp_N + exp_D + exp_e
  residual = top + np.log(total) - log_L
  size = np.abs(residual)
  loss = np.where(size <= delta, 0.5 * residual ** 2, delta * (size - 0.5 * delta)).sum()
  # d loss / d term_k per point: the Huber derivative (the residual clipped to +-delta) times
  # the term's softmax weight.
  scale = np.clip(residual, -delta, delta) / total
  w_N, w_D = exp_N * scale, exp_D * scale
  grad = np.array([w_N.sum(), w_D.sum(), (exp_e * scale).sum(), -(w_N @ log_N),
                   -(w_D @ log_D)])
  return loss, grad


def _minimise(theta0, args, tight: bool):
  # Loose: a few iterations, enough to rank the starts. On the Chinchilla table and on small
  # synthetic ones, the 30 best after 10 iterations all polished to the best optimum that
  # running every start to convergence finds, in a fifth of the time.
  options = (dict(maxiter=10_000, gtol=1e-12, ftol=1e-15) if tight
             else dict(maxiter=SCREEN_ITERATIONS, gtol=1e-8, ftol=1e-10))
  return minimize(_objective, theta0, args=args, jac=True, method="L-BFGS-B", options=options)


def _loose_fits(starts, args):
  """(objective, theta) after a short L-BFGS run from each start; non-finite ones left out."""
  out = []
  for theta0 in starts:
    r = _minimise(theta0, args, tight=False)
    if np.isfinite(r.fun) and np.all(np.isfinite(r.x)):
      out.append((float(r.fun), r.x))
  return out


def _fit_from(starts, log_N, log_D, log_L, delta, *, workers: int = 1, polish: int = 5):
  """A few L-BFGS iterations from every start (spread over `workers` processes), then the
  best `polish` ones to convergence: the grid's 4,500 starts run to convergence took a minute
  on the Chinchilla table, the screen takes a fifth of that."""
  args = (log_N, log_D, log_L, delta)
  if workers > 1 and len(starts) > 100:
    chunks = [starts[i::workers] for i in range(workers)]
    ctx = multiprocessing.get_context("spawn")
    # One BLAS thread per worker (inherited at spawn): with the default, workers oversubscribe
    # the cores and two were slower than one.
    saved = {k: os.environ.get(k) for k in _BLAS_THREAD_VARS}
    os.environ.update({k: "1" for k in _BLAS_THREAD_VARS})
    try:
      with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        results = [r for part in pool.map(_loose_fits, chunks, [args] * workers) for r in part]
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
  else:
    results = _loose_fits(starts, args)
  if not results:
    raise ValueError("no initialisation gave a finite fit")
  results.sort(key=lambda r: r[0])
  polished = [_minimise(theta, args, tight=True) for _, theta in results[:polish]]
  return min(polished, key=lambda r: r.fun)


def grid_starts(grid=None):
  grid = grid or GRID
  return [np.array(p) for p in itertools.product(*(grid[k] for k in _ORDER))]


def fit(N, D, L, *, delta: float = HUBER_DELTA, grid=None, starts=None,
        workers: int = 1) -> tuple:
  """(ScalingLaw, objective value) of the best fit over the initialisation grid.

  `workers` > 1 processes share the grid (spawned: a calling script needs the usual
  `if __name__ == "__main__":` guard)."""
  N, D, L = (np.asarray(x, float) for x in (N, D, L))
  if not (len(N) == len(D) == len(L)) or len(N) < 5:
    raise ValueError(f"need at least 5 runs with N, D and loss, got {len(N)}")
  if np.any(N <= 0) or np.any(D <= 0) or np.any(L <= 0):
    raise ValueError("N, D and loss must all be positive")
  best = _fit_from(grid_starts(grid) if starts is None else starts, np.log(N), np.log(D),
                   np.log(L), delta, workers=workers)
  a, b, e, alpha, beta = best.x
  return ScalingLaw(float(np.exp(e)), float(np.exp(a)), float(np.exp(b)), float(alpha),
                    float(beta)), float(best.fun)


def nearby_starts(law: ScalingLaw) -> list:
  """Initialisations for refits of a subset: the full-data optimum and two points near it."""
  # A coefficient driven to 0 (E, when the runs sit far above the floor) underflows exp(e):
  # its log starts from the smallest positive float instead of -inf.
  a, b, e = np.log(np.maximum([law.A, law.B, law.E], np.finfo(float).tiny))
  centre = np.array([a, b, e, law.alpha, law.beta])
  return [centre] + [centre * f for f in (0.8, 1.2)]


def bootstrap(N, D, L, law: ScalingLaw, *, samples: int = 200, seed: int = 0,
              delta: float = HUBER_DELTA, level: float = 0.95, return_laws: bool = False):
  """{name: (low, high)} percentile intervals of every coefficient over `samples` refits on
  runs resampled with replacement. Each refit starts from the full-data optimum (and a few
  nearby points), not the whole grid: 200 grid searches would take minutes.

  With `return_laws`, (intervals, [ScalingLaw of each refit]): intervals of quantities derived
  from the law (e.g. the compute-optimal loss at some C) come from the refits themselves."""
  N, D, L = (np.asarray(x, float) for x in (N, D, L))
  rng = np.random.default_rng(seed)
  starts = nearby_starts(law)
  laws = []
  for _ in range(samples):
    pick = rng.integers(0, len(N), len(N))
    refit, _ = fit(N[pick], D[pick], L[pick], delta=delta, starts=starts, workers=1)
    laws.append(refit)
  values = [refit.as_dict() for refit in laws]
  tail = 100 * (1 - level) / 2
  intervals = {k: (float(np.percentile([v[k] for v in values], tail)),
                   float(np.percentile([v[k] for v in values], 100 - tail))) for k in values[0]}
  return (intervals, laws) if return_laws else intervals


def budget_of(C, digits: int = 2) -> np.ndarray:
  """Each run's compute budget: C rounded to `digits` significant digits, so the runs of one
  isoFLOP group (whose C differ by the rounding of their step counts) share one."""
  return np.array([float(f"{c:.{digits}g}") for c in np.asarray(C, float)])


def compute_frontier(C, L, digits: int = 2):
  """Indices of the lowest-loss frontier, in order of compute: the best run of each budget
  (`budget_of`) when its loss is below that of every smaller budget."""
  C, L = np.asarray(C, float), np.asarray(L, float)
  budgets = budget_of(C, digits)
  frontier, best = [], np.inf
  for budget in np.unique(budgets):
    members = np.flatnonzero(budgets == budget)
    i = members[np.argmin(L[members])]
    if L[i] < best:
      frontier.append(int(i))
      best = L[i]
  return np.array(frontier, int)


def fit_power_law(C, L) -> tuple:
  """(k, c) of L = k * C^c, least squares in log-log space."""
  c, log_k = np.polyfit(np.log(np.asarray(C, float)), np.log(np.asarray(L, float)), 1)
  return float(np.exp(log_k)), float(c)
