r"""Plot MoE modality specialisation from a run's metrics: for every layer and expert, the share of
the expert's tokens that are image tokens (the per-layer specialisation figure of the NMM paper).

  python -m nmm_jax.train.router_plot --workdir=runs/moe [--step=N] --out=router.png
  nmm-router-plot --workdir=runs/moe --out=router.png

Uses the router statistics each logged step carries (`moe/layer<l>/{image,text}_share/e<j>`,
l counting the MoE layers only: with moe.every or first_dense_layers they are not every layer);
--step picks a logged step (default: the last), --last averages over that many logged steps.
"""
import os
import re

import numpy as np
from absl import app, flags

from nmm_jax import storage

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run folder (metrics.jsonl), local "
                                    "or gs://...")
_OUT = flags.DEFINE_string("out", None, "PNG to write.")
_STEP = flags.DEFINE_integer("step", None, "Logged step to plot (default: the last).")
_LAST = flags.DEFINE_integer("last", 1, "Average over this many logged steps up to --step.")

_KEY = re.compile(r"moe/layer(\d+)/(image|text)_share/e(\d+)$")


def image_fraction(records) -> np.ndarray:
  """[layers, experts]: of the assignments expert e of layer l received, the image share,
  averaged over `records` (metrics.jsonl rows with router statistics)."""
  fractions = []
  for r in records:
    shares = {}
    for key, value in r.items():
      m = _KEY.match(key)
      if m:
        shares[(int(m[1]), m[2], int(m[3]))] = value
    if not shares:
      continue
    layers = 1 + max(k[0] for k in shares)
    experts = 1 + max(k[2] for k in shares)
    image = np.array([[shares[(l, "image", e)] for e in range(experts)] for l in range(layers)])
    text = np.array([[shares[(l, "text", e)] for e in range(experts)] for l in range(layers)])
    image *= r["moe/image_assignments"]
    text *= r["moe/text_assignments"]
    fractions.append(image / np.maximum(image + text, 1e-9))
  if not fractions:
    raise ValueError("no router statistics in these records (is this an MoE run?)")
  return np.mean(fractions, axis=0)


def plot(fraction_LxX: np.ndarray, overall_image: float, path: str, title: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  layers, experts = fraction_LxX.shape
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(4 + 0.5 * experts + 4, 1 + 0.45 * layers + 1.5),
                                gridspec_kw={"width_ratios": [max(experts, 2), 3]})
  im = ax.imshow(fraction_LxX, vmin=0, vmax=1, cmap="coolwarm", aspect="auto")
  ax.set_xlabel("expert")
  ax.set_ylabel("MoE layer")
  ax.set_xticks(range(experts))
  ax.set_yticks(range(layers))
  ax.set_title("image share of each expert's tokens")
  fig.colorbar(im, ax=ax, label="image tokens / all tokens")
  specialisation = np.mean(np.abs(fraction_LxX - overall_image), axis=1)
  ax2.plot(specialisation, range(layers), "o-")
  ax2.set_yticks(range(layers))
  ax2.set_ylim(layers - 0.5, -0.5)
  ax2.set_ylabel("MoE layer")
  ax2.set_xlabel("mean |image share - overall|")
  ax2.set_title("specialisation per layer")
  ax2.grid(True, alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  path = storage.join(_WORKDIR.value, "metrics.jsonl")  # local or in a bucket
  if not storage.path(path).exists():
    raise SystemExit(f"{path} does not exist")
  records = [r for r in storage.read_jsonl(path) if "moe/image_assignments" in r]
  if not records:
    raise SystemExit(f"{path} has no router statistics (is this an MoE run?)")
  if _STEP.value is not None:
    records = [r for r in records if r["step"] <= _STEP.value]
  chosen = records[-_LAST.value:]
  fraction = image_fraction(chosen)
  image = sum(r["moe/image_assignments"] for r in chosen)
  text = sum(r["moe/text_assignments"] for r in chosen)
  plot(fraction, image / max(image + text, 1e-9), _OUT.value,
       f"{os.path.basename(os.path.normpath(_WORKDIR.value))}, step {chosen[-1]['step']}")
  print(f"wrote {_OUT.value}: {fraction.shape[0]} layers x {fraction.shape[1]} experts")


def run():
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)


if __name__ == "__main__":
  run()
