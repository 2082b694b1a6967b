"""Metrics to DIR/metrics.jsonl and TensorBoard (DIR/tb/); only process 0 writes."""
import json
import os

import jax
import numpy as np


class MetricsWriter:
  def __init__(self, workdir: str, *, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # imported here: other processes never need it
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._drop_steps_after(resume_step)
    self.tb = SummaryWriter(os.path.join(workdir, "tb"))

  def _drop_steps_after(self, step: int):
    """A resumed run recomputes the steps after its checkpoint: drop their old records so the file
    holds one record per step, from the run that the checkpoints continue."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in metrics.items():
      self.tb.add_scalar(key, float(value), int(step))

  def close(self):
    if self.enabled:
      self.tb.close()


def router_metrics(stats) -> dict:
  """MoE router statistics of one step (numpy, per layer on the leading axis) -> flat metrics:
  aux losses, dropped assignments, load imbalance (max / mean assignments per expert, averaged
  over layers), and per layer the share of image and of text tokens each expert receives."""
  image, text = np.asarray(stats["image_per_expert"]), np.asarray(stats["text_per_expert"])
  total = image + text
  out = {"moe/load_balance": float(np.mean(stats["load_balance"])),
         "moe/z_loss": float(np.mean(stats["z_loss"])),
         "moe/dropped": float(np.sum(stats["dropped"])),
         "moe/imbalance": float(np.mean(total.max(-1) / np.maximum(total.mean(-1), 1e-9))),
         # Assignments of image / text tokens per layer (top_k per token): the shares' totals.
         "moe/image_assignments": float(image[0].sum()),
         "moe/text_assignments": float(text[0].sum())}
  for layer in range(total.shape[0]):
    for name, counts in (("image", image[layer]), ("text", text[layer])):
      shares = counts / max(counts.sum(), 1e-9)
      out.update({f"moe/layer{layer}/{name}_share/e{e}": float(v) for e, v in enumerate(shares)})
  return out
