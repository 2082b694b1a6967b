"""The whole model (image front end + decoder) as a Hugging Face remote-code folder.

`nmm-export --format=hf-multimodal` writes:

  config.json               NMMConfig (model_type "nmm_jax"): nmm_jax's model config, every
                            parameter's shape, the image size, the special ids; auto_map names
                            the remote classes for AutoConfig / AutoModelForCausalLM
  model.safetensors         every parameter as `nmm.params.<our name, '.' -> '/'>`
  configuration_nmm.py, modeling_nmm.py, processing_nmm.py
                            hf_remote/'s templates: the config, NMMForCausalLM (nmm_torch's math
                            with a key/value cache) and NMMProcessor (our prompt layout)
  nmm_torch.py              the pure-PyTorch reference itself, imported relatively by
                            modeling_nmm.py (transformers copies it along): one copy of the math
  generation_config.json    <bos>/<eos>/<pad>, and suppress_tokens: the ids nmm_jax's generation
                            never samples (image markers, <pad>, <bos>, ids past the tokenizer)
  tokenizer.json, tokenizer_config.json, processor_config.json
                            the run's tokenizer and the processor (image size, patch size);
                            auto_map names NMMProcessor for AutoProcessor

so `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` and
`AutoProcessor.from_pretrained(OUT, trust_remote_code=True)` need transformers, torch and PIL,
not nmm_jax. MoE layers are written dropless (`moe.capacity_factor` 0), as nmm_jax's own
generation runs them (eval/inference.py): a capacity's drops depend on the padded row length.
"""
import json
import os
import shutil

import numpy as np

from nmm_jax.data.tokenizer import load_tokenizer
from nmm_jax.export import hf
from nmm_jax.export.safetensors_file import Tensor, write

REMOTE_DIR = os.path.join(os.path.dirname(__file__), "hf_remote")
REMOTE_FILES = ("configuration_nmm.py", "modeling_nmm.py", "processing_nmm.py")
AUTO_MAP = {"AutoConfig": "configuration_nmm.NMMConfig",
            "AutoModelForCausalLM": "modeling_nmm.NMMForCausalLM"}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_nmm.NMMProcessor"}
PREFIX = "nmm.params."  # NMMForCausalLM.nmm is an NMMTorch: its ParameterDict `params`


def weight_name(ours: str) -> str:
  """The state-dict name of our parameter `ours` in NMMForCausalLM."""
  return PREFIX + ours.replace(".", "/")


def model_dict(model_cfg) -> dict:
  """The model config the exported model computes with: MoE dropless (see the docstring)."""
  m = model_cfg.to_dict()
  m["moe"] = {**m["moe"], "capacity_factor": 0.0}
  return m


def suppressed_ids(tokenizer, vocab_size: int) -> list[int]:
  """The ids eval/inference.py's `allowed` mask excludes: past the tokenizer's vocabulary, its
  non-text ids (<pad>, image markers) and <bos>."""
  allowed = np.zeros(vocab_size, bool)
  allowed[:tokenizer.vocab_size] = True
  allowed[[i for i in list(tokenizer.non_text_ids) + [tokenizer.bos_id] if i is not None]] = False
  return [int(i) for i in np.flatnonzero(~allowed)]


def write_folder(flat: dict, config, tokenizer_path: str, out: str, step: int):
  """The folder (see the module docstring) from our flat parameters and the run's config."""
  m = config.model
  write(os.path.join(out, hf.WEIGHTS_FILE),
        [Tensor(weight_name(name), a.shape, a.dtype, lambda a=a: np.asarray(a))
         for name, a in flat.items()], {"format": "pt", "step": str(step)}, progress=True)
  token_ids = hf.special_token_ids(tokenizer_path)
  model_config = {
      "model_type": "nmm_jax", "architectures": ["NMMForCausalLM"], "auto_map": AUTO_MAP,
      "nmm_model": model_dict(m),
      "param_shapes": {name: list(a.shape) for name, a in flat.items()},
      "image_size": config.data.image_size, "vocab_size": m.vocab_size,
      "hidden_size": m.d_model, "num_hidden_layers": m.num_layers,
      "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
      "head_dim": m.head_dim, "max_position_embeddings": config.data.seq_len,
      "tie_word_embeddings": False, "use_cache": True, "dtype": "float32", **token_ids}
  _write_json(os.path.join(out, "config.json"), model_config)
  for name in REMOTE_FILES:
    shutil.copy(os.path.join(REMOTE_DIR, name), out)
  shutil.copy(os.path.join(os.path.dirname(__file__), "nmm_torch.py"), out)
  if not tokenizer_path.endswith(".json"):
    # transformers needs a model class to wrap a SentencePiece file; without a tokenizer
    # there is no processor (the model still loads and takes ids).
    print("hf-multimodal: the run has no tokenizer.json: no processor and no "
          "generation_config.json in the folder")
    hf.save_tokenizer(tokenizer_path, out, token_ids)
    return
  tokenizer = load_tokenizer(tokenizer_path)
  generation = {**token_ids, "suppress_tokens": suppressed_ids(tokenizer, m.vocab_size)}
  _write_json(os.path.join(out, "generation_config.json"), generation)
  hf.save_tokenizer(tokenizer_path, out, token_ids)
  # transformers 5 finds a remote processor through processor_config.json's auto_map; the
  # tokenizer config names it too (older readers look there).
  _write_json(os.path.join(out, "processor_config.json"),
              {"processor_class": "NMMProcessor", "auto_map": PROCESSOR_AUTO_MAP,
               "image_size": config.data.image_size, "patch_size": m.patch_size})
  tokenizer_config = os.path.join(out, "tokenizer_config.json")
  with open(tokenizer_config) as f:
    saved = json.load(f)
  _write_json(tokenizer_config, {**saved, "processor_class": "NMMProcessor",
                                 "auto_map": {**saved.get("auto_map", {}), **PROCESSOR_AUTO_MAP}})


def _write_json(path: str, value: dict):
  with open(path, "w") as f:
    json.dump(value, f, indent=2)
