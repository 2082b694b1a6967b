"""The text decoder <-> a Hugging Face causal-LM folder, in the family whose block is ours.

Our decoder block is the Qwen3 block (RMSNorm, GQA with the KV heads in Hugging Face's order,
half-split RoPE, per-head q/k RMSNorm before RoPE, SwiGLU, no biases), or the Llama block when
QK-norm is off, so the mapping is renames and transposes only. Layer i's parameters are
`<stack>.<name>[index]` (`_layer_source`): `decoder.blocks.*[i]` in a dense decoder; in an MoE
one `decoder.dense_blocks.*[i]` for the moe.first_dense_layers, then `decoder.blocks.*[j]`
(moe.every=1) or, with every=N > 1, `decoder.blocks.dense.*[group, j]` and
`decoder.blocks.moe_block.*[group]` for the group's last (MoE) layer:

  embed_VxD                      model.embed_tokens.weight            [V, D]
  <layer i>.attn_norm.scale      model.layers.i.input_layernorm.weight
  <layer i>.attn.w_q_DxHxE       model.layers.i.self_attn.q_proj.weight  [H*E, D] (transposed)
  ... w_k_DxKxE, w_v_DxKxE       k_proj, v_proj                       [K*E, D]
  <layer i>.attn.w_o_HxExD       model.layers.i.self_attn.o_proj.weight  [D, H*E]
  <layer i>.attn.{q,k}_norm.scale  model.layers.i.self_attn.{q,k}_norm.weight (Qwen3)
  <layer i>.mlp_norm.scale       model.layers.i.post_attention_layernorm.weight
  <layer i>.mlp.w_{gate,up}_DxF, w_down_FxD
                                 model.layers.i.mlp.{gate,up,down}_proj.weight
  MoE layers (Qwen3MoeForCausalLM):
  <layer i>.mlp.w_router_DxX     model.layers.i.mlp.gate.weight       [X, D]
  <layer i>.mlp.w_{gate,up}_XxDxF[e], w_down_XxFxD[e]
                                 model.layers.i.mlp.experts.e.{gate,up,down}_proj.weight
  final_norm.scale               model.norm.weight
  head_DxV                       lm_head.weight [V, D] (absent when embeddings are tied)

The experts are written one tensor per expert and projection: the layout of the published
Qwen3-MoE checkpoints, and what transformers' own save_pretrained writes. transformers >= 5
fuses them into its experts.gate_up_proj / down_proj on load (conversion_mapping.py); readers
of the published checkpoints take them as they are.

Image parts (patch projection, vision encoder, connector, fusion blocks) have no place in these
families and are left out: the export is the text decoder. An MoE decoder exports only when it
is exactly Qwen3-MoE: learned routing, dropless, aux-loss balancing, no shared experts, QK-norm
(`family` names the key that rules out the others). Import takes dense folders only.
"""
import json
import os
import shutil

import jax
import numpy as np

from nmm_jax.config import ConfigError
from nmm_jax.data.tokenizer import load_tokenizer
from nmm_jax.export.safetensors_file import Tensor

WEIGHTS_FILE = "model.safetensors"
# transformers' names of our special tokens (data/tokenizer.py's), as config keys and as
# tokenizer arguments: the same three, so the config and the tokenizer folder agree.
HF_SPECIAL_TOKENS = {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"}


class ExportError(ValueError):
  """A model (or checkpoint folder) that the Hugging Face families cannot represent."""


def family(model_cfg) -> str:
  """The Hugging Face architecture whose block is ours, or ExportError."""
  moe = model_cfg.moe
  if not moe.num_experts:
    return "Qwen3ForCausalLM" if model_cfg.qk_norm else "LlamaForCausalLM"
  # Each refusal is a behaviour Qwen3-MoE's forward pass does not have, so its log-probs would
  # differ from ours; the nmm_jax formats keep everything.
  refusals = [
      (moe.routing != "learned", f"model.moe.routing={moe.routing!r}",
       "no Hugging Face family routes by modality"),
      (moe.capacity_factor > 0, f"model.moe.capacity_factor={moe.capacity_factor}",
       "ours drops the assignments past each expert's capacity; Qwen3-MoE is dropless"),
      (moe.balance != "aux_loss", f"model.moe.balance={moe.balance!r}",
       "the balancing bias changes which experts are chosen; Qwen3-MoE's router has no bias"),
      (moe.num_shared_experts > 0, f"model.moe.num_shared_experts={moe.num_shared_experts}",
       "Qwen3-MoE has no shared experts"),
      (not model_cfg.qk_norm, "model.qk_norm=False",
       "the only MoE family here is Qwen3-MoE, whose attention has QK-norm"),
  ]
  for refused, key, why in refusals:
    if refused:
      raise ExportError(f"{key} with model.moe.num_experts={moe.num_experts}: {why}, so the MoE "
                        f"decoder matches no Hugging Face family; export it with "
                        f"--format=safetensors or --format=torch")
  return "Qwen3MoeForCausalLM"


def special_token_ids(tokenizer_path: str) -> dict:
  """{"bos_token_id": id, "eos_token_id": id, "pad_token_id": id} of the run's tokenizer file;
  {} when the run has none (the config then keeps its family's defaults, as before)."""
  if not tokenizer_path:
    return {}
  # A token the file lacks stays None (null in the JSON): generate() would otherwise stop at, or
  # pad with, some other token. The pipeline refuses such files, so a run's own file has all.
  tokenizer = load_tokenizer(tokenizer_path, require_specials=False)
  ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
  return {f"{name}_token_id": ids[name] for name in HF_SPECIAL_TOKENS}


def hf_config(model_cfg, max_positions: int, token_ids: dict | None = None):
  """The transformers config object of the exported model; `token_ids`: special_token_ids."""
  import transformers
  arch = family(model_cfg)
  m = model_cfg
  common = dict(
      **(token_ids or {}),
      architectures=[arch], vocab_size=m.vocab_size, hidden_size=m.d_model,
      intermediate_size=m.mlp_dim, num_hidden_layers=m.num_layers,
      num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim,
      hidden_act="silu", rms_norm_eps=m.norm_eps, max_position_embeddings=max_positions,
      rope_parameters={"rope_type": "default", "rope_theta": float(m.rope_theta)},
      tie_word_embeddings=bool(m.tie_embeddings), attention_bias=False,
      dtype=str(m.param_dtype))
  if arch == "Qwen3MoeForCausalLM":
    moe = m.moe
    # Layer i is MoE in HF iff i is not in mlp_only_layers and (i + 1) % decoder_sparse_step
    # == 0: ours (i >= first, (i - first) % every == every - 1) since first % every == 0.
    # Top-1 weights by the raw probability (HF's norm_topk_prob would make it 1).
    return transformers.Qwen3MoeConfig(
        **common, num_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
        norm_topk_prob=bool(moe.normalize_topk and moe.top_k > 1),
        moe_intermediate_size=m.mlp_dim, decoder_sparse_step=moe.every,
        mlp_only_layers=list(range(moe.first_dense_layers)), output_router_logits=False,
        router_aux_loss_coef=float(moe.load_balance_weight))
  config_class = transformers.Qwen3Config if arch.startswith("Qwen3") else transformers.LlamaConfig
  return config_class(**common, mlp_bias=False)


def _layer_map(qk_norm: bool):
  """(our name within a block, HF per-layer name, ours[i] -> HF array) of a dense block."""
  def heads_in(w_DxHxE):
    return w_DxHxE.reshape(w_DxHxE.shape[0], -1).T

  def heads_out(w_HxExD):
    return w_HxExD.reshape(-1, w_HxExD.shape[-1]).T

  rows = [
      ("attn_norm.scale", "input_layernorm.weight", None),
      ("attn.w_q_DxHxE", "self_attn.q_proj.weight", heads_in),
      ("attn.w_k_DxKxE", "self_attn.k_proj.weight", heads_in),
      ("attn.w_v_DxKxE", "self_attn.v_proj.weight", heads_in),
      ("attn.w_o_HxExD", "self_attn.o_proj.weight", heads_out),
      ("mlp_norm.scale", "post_attention_layernorm.weight", None),
      ("mlp.w_gate_DxF", "mlp.gate_proj.weight", np.transpose),
      ("mlp.w_up_DxF", "mlp.up_proj.weight", np.transpose),
      ("mlp.w_down_FxD", "mlp.down_proj.weight", np.transpose),
  ]
  if qk_norm:
    rows += [("attn.q_norm.scale", "self_attn.q_norm.weight", None),
             ("attn.k_norm.scale", "self_attn.k_norm.weight", None)]
  return rows


def _moe_layer_map(qk_norm: bool, num_experts: int):
  """(our name within the block, HF per-layer name, fn, expert) of an MoE block: the expert
  rows read ours[layer index][expert], the others ours[layer index] (expert None)."""
  rows = [(ours, theirs, fn, None) for ours, theirs, fn in _layer_map(qk_norm)
          if not ours.startswith("mlp.")]
  rows.append(("mlp.w_router_DxX", "mlp.gate.weight", np.transpose, None))
  for e in range(num_experts):
    rows += [("mlp.w_gate_XxDxF", f"mlp.experts.{e}.gate_proj.weight", np.transpose, e),
             ("mlp.w_up_XxDxF", f"mlp.experts.{e}.up_proj.weight", np.transpose, e),
             ("mlp.w_down_XxFxD", f"mlp.experts.{e}.down_proj.weight", np.transpose, e)]
  return rows


def _layer_source(model_cfg, i: int):
  """(stacked-name prefix, index into the stack, is MoE) of decoder layer i (models/decoder.py's
  layout; nmm_torch's NMMTorch._layer reads it the same way)."""
  moe = model_cfg.moe
  if not moe.num_experts:
    return "decoder.blocks.", (i,), False
  first, every = moe.first_dense_layers, moe.every
  if i < first:
    return "decoder.dense_blocks.", (i,), False
  if every == 1:
    return "decoder.blocks.", (i - first,), True
  group, j = divmod(i - first, every)
  if j == every - 1:
    return "decoder.blocks.moe_block.", (group,), True
  return "decoder.blocks.dense.", (group, j), False


def export_tensors(flat: dict, model_cfg) -> list:
  """The HF tensors (made one at a time when written) from our flat parameters."""
  family(model_cfg)
  tensors = []

  def add(name, source, fn=None, index=()):
    array = flat[source]
    layer_shape = array.shape[len(index):]
    # The shape after `fn`, traced abstractly (nothing allocated).
    abstract = jax.ShapeDtypeStruct(layer_shape, np.float32)
    shape = jax.eval_shape(lambda w: fn(w), abstract).shape if fn else layer_shape

    def make():
      # Index first, then copy: one layer's (one expert's) slice, not the whole stack.
      a = np.asarray(flat[source][index] if index else flat[source])
      return fn(a) if fn else a
    tensors.append(Tensor(name, tuple(shape), np.dtype(array.dtype), make))

  add("model.embed_tokens.weight", "embed_VxD")
  for i in range(model_cfg.num_layers):
    prefix, index, is_moe = _layer_source(model_cfg, i)
    rows = (_moe_layer_map(model_cfg.qk_norm, model_cfg.moe.num_experts) if is_moe else
            [(ours, theirs, fn, None) for ours, theirs, fn in _layer_map(model_cfg.qk_norm)])
    for ours, theirs, fn, expert in rows:
      add(f"model.layers.{i}.{theirs}", prefix + ours, fn,
          index=index if expert is None else index + (expert,))
  add("model.norm.weight", "final_norm.scale")
  if not model_cfg.tie_embeddings:
    add("lm_head.weight", "head_DxV", np.transpose)
  return tensors


def generation_config(token_ids: dict):
  """The GenerationConfig that generate() reads from generation_config.json: the same ids as
  config.json, so greedy decoding stops at <eos> and pads with <pad>."""
  import transformers
  return transformers.GenerationConfig(**token_ids)


def save_tokenizer(path: str, out: str, token_ids: dict | None = None):
  """The run's tokenizer in `out`, loadable by AutoTokenizer when it is a tokenizer.json; a
  SentencePiece model is copied as it is (transformers needs a model class to wrap it).
  `token_ids` (special_token_ids) says which special tokens the file has."""
  if not path:
    print("hf: the run's tokenizer file was not found; the folder has none")
    return
  if path.endswith(".json"):
    import transformers
    token_ids = special_token_ids(path) if token_ids is None else token_ids
    # Only the tokens the file has: transformers would add a missing one as a new token, past
    # the model's vocabulary.
    specials = {f"{name}_token": token for name, token in HF_SPECIAL_TOKENS.items()
                if token_ids[f"{name}_token_id"] is not None}
    transformers.PreTrainedTokenizerFast(tokenizer_file=path, **specials).save_pretrained(out)
  else:
    shutil.copy(path, os.path.join(out, os.path.basename(path)))


def read_config(folder: str) -> dict:
  """The decoder sizes (our model keys) of a Hugging Face Qwen3 / Llama folder's config.json;
  ExportError for a model whose block is not ours."""
  config_path = os.path.join(folder, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
  with open(config_path) as f:
    hf = json.load(f)
  if hf.get("model_type") == "qwen3_moe":
    raise ExportError(f"{config_path}: model_type 'qwen3_moe': importing MoE checkpoints is not "
                      f"supported; import takes dense qwen3 and llama folders")
  if hf.get("model_type") not in ("qwen3", "llama"):
    raise ExportError(f"{config_path}: model_type {hf.get('model_type')!r} "
                      f"({hf.get('architectures')}) is not one whose block is ours; qwen3 and "
                      f"llama are")
  if hf.get("hidden_act", "silu") != "silu":
    raise ExportError(f"{config_path}: hidden_act {hf['hidden_act']!r}; ours is silu (SwiGLU)")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      raise ExportError(f"{config_path}: {key} is set; our blocks have no biases")
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if rope.get("rope_type", "default") != "default":
    raise ExportError(f"{config_path}: RoPE type {rope.get('rope_type')!r}; ours is the default")
  heads = hf["num_attention_heads"]
  return {
      "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"],
      "num_layers": hf["num_hidden_layers"], "num_heads": heads,
      "num_kv_heads": hf.get("num_key_value_heads") or heads,
      "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
      "mlp_dim": hf["intermediate_size"], "qk_norm": hf["model_type"] == "qwen3",
      "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
      "norm_eps": float(hf["rms_norm_eps"]),
      "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
  }


def check_init_from(config):
  """ConfigError unless `train.init_from_hf` (when set) is a folder whose decoder has the
  config's shape. The loop calls this right after config.validate, before anything is built."""
  folder = config.train.init_from_hf
  if not folder:
    return
  try:
    sizes = read_config(folder)
  except (OSError, ValueError) as e:
    raise ConfigError(f"config.train.init_from_hf: {e}") from None
  differ = {k: (config.model[k], v) for k, v in sizes.items() if config.model[k] != v}
  if differ:
    raise ConfigError(
        f"config.train.init_from_hf: {folder} has another decoder shape; set these model keys "
        f"to the folder's values: " + ", ".join(f"model.{k}={v!r} (config: {ours!r})"
                                                 for k, (ours, v) in differ.items()))
  if config.model.moe.num_experts:
    raise ConfigError("config.train.init_from_hf: an MoE decoder cannot start from a dense "
                      "Hugging Face model")


def import_folder(folder: str):
  """A Hugging Face Qwen3 or Llama folder -> (model config overrides, {our flat name: array}).

  The arrays are stacked over layers as our decoder holds them; the overrides set the decoder's
  sizes (apply them to a config before building the model)."""
  from safetensors import safe_open
  overrides = read_config(folder)
  qk_norm, heads, head_dim = overrides["qk_norm"], overrides["num_heads"], overrides["head_dim"]
  files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"{folder} has no .safetensors weights")
  hf_tensors = {}
  for name in files:
    # framework="flax": numpy has no bfloat16, the dtype most published checkpoints use.
    with safe_open(os.path.join(folder, name), framework="flax") as f:
      for key in f.keys():
        hf_tensors[key] = np.asarray(f.get_tensor(key))

  def take(key):
    if key not in hf_tensors:
      raise ExportError(f"{folder}: weight {key} is missing")
    return hf_tensors.pop(key)

  d, k, e = overrides["d_model"], overrides["num_kv_heads"], head_dim
  inverse = {"self_attn.q_proj.weight": lambda w: w.T.reshape(d, heads, e),
             "self_attn.k_proj.weight": lambda w: w.T.reshape(d, k, e),
             "self_attn.v_proj.weight": lambda w: w.T.reshape(d, k, e),
             "self_attn.o_proj.weight": lambda w: w.T.reshape(heads, e, d),
             "mlp.gate_proj.weight": np.transpose, "mlp.up_proj.weight": np.transpose,
             "mlp.down_proj.weight": np.transpose}
  flat = {"embed_VxD": take("model.embed_tokens.weight"),
          "final_norm.scale": take("model.norm.weight")}
  for ours, theirs, _ in _layer_map(qk_norm):
    fn = inverse.get(theirs, lambda w: w)
    flat["decoder.blocks." + ours] = np.stack([fn(take(f"model.layers.{i}.{theirs}"))
                           for i in range(overrides["num_layers"])])
  if not overrides["tie_embeddings"]:
    flat["head_DxV"] = take("lm_head.weight").T
  hf_tensors.pop("lm_head.weight", None)  # tied: some writers store the copy anyway
  if hf_tensors:
    raise ExportError(f"{folder}: weights with no place in our decoder: "
                      f"{sorted(hf_tensors)[:5]}{' ...' if len(hf_tensors) > 5 else ''}")
  return overrides, flat
