"""nmm-scaling params: parameter and FLOP counts of configs, from scaling/flops.py.

  nmm-scaling params --config=configs/paper.py:early-932m [--config.model.d_model=...]
  nmm-scaling params --family=configs/paper.py

With --family, every config the file lists in SPECS (each passed to its get_config), beside
the counts in its REFERENCE_PARAMS where it gives one. Prints a Markdown table: total
parameters, active matmul parameters per token (N; MoE: top_k experts), the encoder's per patch
(N_v, late fusion), and training FLOPs per sequence (forward + backward, full image slots).
"""
import importlib.util
import os

from absl import flags
from ml_collections import config_flags

from nmm_jax import config as config_lib
from nmm_jax.scaling import flops

config_flags.DEFINE_config_file("config", None, "One config file (FILE.py[:ARG]).",
                                lock_config=False)
flags.DEFINE_string("family", None, "A config file listing SPECS (and REFERENCE_PARAMS).")
FLAGS = flags.FLAGS
COLUMNS = ("config", "d_model", "layers", "total", "active N", "vision N_v", "train GFLOP/seq",
           "reference", "total vs reference")


def load_family(path: str):
  """(SPECS, REFERENCE_PARAMS, get_config) of a family config file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--family: no config file {path}")
  spec = importlib.util.spec_from_file_location("family_config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "SPECS"):
    raise ValueError(f"--family: {path} has no SPECS (the get_config arguments to list)")
  return tuple(module.SPECS), dict(getattr(module, "REFERENCE_PARAMS", {})), module.get_config


def row(name: str, config, reference=None) -> dict:
  m = config.model
  counts = flops.param_counts(m)
  layers = (f"{m.vision.num_layers}+{m.num_layers}" if m.fusion == "late" else str(m.num_layers))
  train_flops = flops.train_flops_per_sequence(m, config.data.seq_len, config.data.max_images)
  return {
      "config": name, "d_model": str(m.d_model), "layers": layers,
      "total": _millions(counts["total"]), "active N": _millions(counts["matmul"]),
      "vision N_v": _millions(counts["vision_matmul"]) if counts["vision_matmul"] else "-",
      "train GFLOP/seq": f"{train_flops / 1e9:,.0f}",
      "reference": _millions(reference) if reference else "-",
      "total vs reference": f"{counts['total'] / reference - 1:+.2%}" if reference else "-",
  }


def markdown(rows) -> str:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(r[c] for c in COLUMNS) + " |" for r in rows]
  return "\n".join(lines)


def _millions(n) -> str:
  return f"{n / 1e6:,.1f}M"


def main(argv):
  del argv
  if bool(FLAGS.family) == bool(FLAGS.config):
    raise ValueError("give one of --config=FILE.py[:ARG] or --family=FILE.py")
  if FLAGS.family:
    specs, references, get_config = load_family(FLAGS.family)
    rows = []
    for spec in specs:
      config = get_config(spec)
      config_lib.validate(config, num_devices=1)
      rows.append(row(spec, config, references.get(spec)))
  else:
    config_lib.validate(FLAGS.config, num_devices=1)
    rows = [row(config_flags.get_config_filename(FLAGS["config"]), FLAGS.config)]
  print(markdown(rows))
