"""What nmm-export does, without its command-line flags (tests and scripts call `export`)."""
import json
import os
import shutil

from absl import logging


def export(workdir: str, out: str, fmt: str, step: int | None = None) -> str:
  """Writes the export; returns the weights file's path."""
  import nmm_jax
  from nmm_jax.export import hf, run_checkpoint, safetensors_file
  if os.path.isdir(out) and os.listdir(out):
    raise FileExistsError(f"--out={out} is not empty; give a new folder")
  run = run_checkpoint.open_run(workdir, step)
  if fmt == "hf":
    hf.family(run.config.model)  # refuse before reading any weights
  print(f"reading step {run.step} of {workdir} ...", flush=True)
  flat = run_checkpoint.flat_params(run.params())
  os.makedirs(out, exist_ok=True)
  weights = os.path.join(out, hf.WEIGHTS_FILE)
  if fmt == "hf-multimodal":
    from nmm_jax.export import hf_multimodal
    hf_multimodal.write_folder(flat, run.config, run.tokenizer_path, out, run.step)
  elif fmt in ("safetensors", "torch"):
    tensors = [safetensors_file.Tensor(name, a.shape, a.dtype, lambda a=a: a)
               for name, a in flat.items()]
    safetensors_file.write(weights, tensors, {"format": "nmm_jax", "step": run.step},
                           progress=True)
    tokenizer = _copy_tokenizer(run.tokenizer_path, out)
    with open(os.path.join(out, "nmm_config.json"), "w") as f:
      json.dump({"format": "nmm_jax", "nmm_jax_version": nmm_jax.__version__, "step": run.step,
                 "names": "path in the model joined by '.'; stacked layers on axis 0",
                 "tokenizer": tokenizer, "model": run.config.model.to_dict(),
                 "data": {k: run.config.data[k] for k in ("seq_len", "image_size", "max_images")}},
                f, indent=2)
    if fmt == "torch":
      shutil.copy(os.path.join(os.path.dirname(__file__), "nmm_torch.py"), out)
  else:
    m = run.config.model
    print("hf: the text decoder only; the image parts have no place in these families")
    safetensors_file.write(weights, hf.export_tensors(flat, m), {"format": "pt"}, progress=True)
    token_ids = hf.special_token_ids(run.tokenizer_path)
    hf.hf_config(m, run.config.data.seq_len, token_ids).save_pretrained(out)
    if token_ids:  # without a tokenizer there are no ids to give generate(): no file, as before
      hf.generation_config(token_ids).save_pretrained(out)
    hf.save_tokenizer(run.tokenizer_path, out, token_ids)
  print(f"wrote {out}")
  return weights


def _copy_tokenizer(path: str, out: str) -> str:
  if not path:
    logging.warning("the run's tokenizer file was not found; the export has none")
    return ""
  shutil.copy(path, os.path.join(out, os.path.basename(path)))
  return os.path.basename(path)
