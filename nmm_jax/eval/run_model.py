"""A training run's checkpoint loaded for evaluation: parameters on one device, its tokenizer."""
import jax

from nmm_jax.data.tokenizer import load_tokenizer
from nmm_jax.eval.inference import InferenceModel
from nmm_jax.export.run_checkpoint import open_run


def load_run(workdir: str, step: int | None = None) -> InferenceModel:
  """The checkpoint at `step` (default: the latest) of the run in `workdir`, its parameters on
  the first device (the optimizer state stays on disk)."""
  run = open_run(workdir, step)
  if not run.tokenizer_path:
    raise FileNotFoundError(f"the tokenizer of {workdir} (data.tokenizer or a tokenizer file in "
                            f"the data folder) is gone: generation needs it")
  params = jax.device_put(run.params(), jax.devices()[0])
  return InferenceModel(run.config, params, load_tokenizer(run.tokenizer_path), step=run.step)
