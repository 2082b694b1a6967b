"""Tables of parameter and FLOP counts of configs (what `nmm-scaling params` prints)."""
import importlib.util
import os

from nmm_jax.scaling import flops

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
