"""The config tree every experiment starts from, and its validation.

Experiment files in configs/ call `base_config()` and change what they need. `validate` runs
before any model is built or compiled and raises ConfigError naming the offending key.
"""
import copy
import math

import ml_collections

from nmm_jax import xla_flags
from nmm_jax.sharding import (
    DEFAULT_SHARDING_RULES,
    MESH_AXES,
    SEQUENCE_PARALLEL_RULES,
    batch_axes,
    batch_shards,
    mesh_axes_of,
)

FUSIONS = ("early", "late")
# How late fusion feeds encoder layers to the decoder (models/fusion.py): "none" = the last layer
# only (plain late fusion); the rest use model.vision_layers.
VISION_FUSIONS = ("none", "input_concat", "internal_add", "internal_xattn")
SCHEDULES = ("inverse_sqrt", "cosine")
REMATS = ("none", "full", "save_dots")
SYNTHETIC_KINDS = ("shapes", "world")  # data.synthetic.kind: data/synthetic.py, data/world.py
# models/attention_kernels.py: the [L, L] scores in XLA, Pallas flash kernels reading the mask
# as key ranges, cuDNN's fused kernel (GPU), or flash on TPU/GPU and xla elsewhere.
ATTENTION_IMPLEMENTATIONS = ("xla", "flash", "cudnn", "auto")
DTYPES = ("float32", "bfloat16")
MOE_BALANCES = ("aux_loss", "bias")
# The experts' grouped matmul (models/grouped_matmul.py) and the expert-parallel exchange
# (models/moe.py); "auto" picks per platform at lowering time.
MOE_GROUPED_MATMULS = ("auto", "ragged_dot", "megablox")
MOE_EXCHANGES = ("auto", "all_to_all", "ragged")


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = dict(
      fusion="early",
      vocab_size=128,
      d_model=128,
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,
      head_dim=32,
      mlp_dim=384,
      qk_norm=True,
      rope_theta=10_000.0,
      norm_eps=1e-6,
      tie_embeddings=False,
      patch_size=8,
      num_channels=3,
      dtype="float32",        # compute dtype: "bfloat16" on accelerators (f32 accumulation,
                              # norms, softmax, logits and loss stay f32)
      param_dtype="float32",  # parameters and optimizer moments: always f32 (validate())
      remat="none",           # one of REMATS
      attention="auto",       # one of ATTENTION_IMPLEMENTATIONS
      # Flash attention tiles, query and key positions: 0 = the platform's default (512 on TPU,
      # 64 on GPU: attention_kernels.py), else a power of two >= 128 (works on both). A sequence
      # is padded to a multiple of both.
      flash_block_q=0,
      flash_block_k=0,
      scan_unroll=1,          # layers per scan iteration; >= num_layers: no loop (faster,
                              # longer compile)
      # Mixture of experts (models/moe.py): num_experts > 0 makes decoder MLPs MoEs.
      moe=dict(num_experts=0, top_k=1,
               routing="learned",          # or "modality": image experts / text experts
               # top_k > 1: the k chosen probabilities renormalised to sum 1 (Mixtral, Qwen3-MoE)
               # or used as they are (DeepSeek). Top-1 always scales by the probability (Switch):
               # renormalised it would be 1 and the router would get no gradient from the loss.
               normalize_topk=True,
               capacity_factor=0.0,        # 0: dropless (grouped matmul); > 0: capacity path
               # "aux_loss": the Switch load-balancing loss (load_balance_weight); "bias":
               # DeepSeek-V3's auxiliary-loss-free balancing, a per-expert bias added to the
               # router probabilities for selection only, moved by bias_update_rate * sign(mean
               # load - expert load) after each step (the balance loss is then not added).
               balance="aux_loss",
               bias_update_rate=0.001,
               load_balance_weight=0.01,   # Switch load-balancing loss
               z_loss_weight=0.001,        # router z-loss
               num_shared_experts=0,       # always-on experts beside the routed ones (one SwiGLU
                                           # of num_shared_experts * mlp_dim hidden units)
               first_dense_layers=0,       # the first layers keep a dense MLP (a multiple of every)
               # Dropless path on accelerators (auto: megablox on TPU, ragged_dot elsewhere) and
               # the expert-parallel exchange (auto: ragged_all_to_all on TPU/GPU, sending only
               # the real assignments; all_to_all of worst-case buffers on CPU).
               grouped_matmul="auto",
               exchange="auto",
               # Expert parallelism, dropless path: an expert device's receive buffer, in
               # multiples of a device's own assignments. 0: mesh.expert times (the worst case:
               # nothing dropped, at expert x the buffer memory); e.g. 2: overflow beyond twice a
               # balanced load is dropped (counted in moe/dropped). Same drops on every platform.
               exchange_capacity=0.0,
               every=1),                   # then MoE in every N-th layer (the N-th, 2N-th, ...)
      # Late fusion (fusion="late"): a ViT trained from scratch + a 2-layer GELU connector.
      vision=dict(d_model=64, num_layers=4, num_heads=4, mlp_dim=256,
                  head_dim=0,          # 0: d_model / num_heads (heads split the width exactly)
                  num_patches=16,      # (data.image_size / patch_size)^2
                  lr_scale=1.0,        # the encoder's learning rate = lr * lr_scale
                  freeze=False),       # no gradient into the encoder
      vision_fusion="none",            # one of VISION_FUSIONS
      vision_layers=(-1,),             # encoder layers used (negative: from the end); the last
                                       # listed is the decoder's input in the internal modes
      fusion_decoder_layers=(),        # internal modes: the decoder layer each other listed
                                       # encoder layer is added / cross-attended before
  )
  # dcn_data / dcn_fsdp: how many TPU slices (or GPU hosts) the data / fsdp axes span, over the
  # data-centre network (MaxText's dcn_* split); the rest of each axis is within a slice.
  # sequence_parallel: the residual stream and norms split along positions over tensor too
  # (Megatron sequence parallelism: less activation memory at tensor > 1, same FLOPs).
  c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1, dcn_data=1, dcn_fsdp=1,
                sequence_parallel=False)
  c.sharding_rules = DEFAULT_SHARDING_RULES

  c.data = dict(
      # A folder (or gs://... / s3://... folder, copied to cache_dir first: nmm_jax/storage.py);
      # empty: generate the embedded shapes data under WORKDIR/data (under cache_dir when the
      # workdir is in a bucket).
      dir="",
      cache_dir="",           # local copies of bucket data; empty: $XDG_CACHE_HOME or ~/.cache
      seq_len=256,
      image_size=32,
      max_images=10,          # images per packed sequence
      mixture=dict(caption=0.45, interleaved=0.45, text=0.10),
      num_packing_bins=8,
      num_workers=0,          # training pipeline worker processes (Grain mp_prefetch);
                              # 0: in-process
      prefetch=2,             # batches prepared ahead in a background thread; 0: none
      streams=0,              # independent pipelines making the global batch (data/streams.py);
                              # 0: one per process. Fix it to resume under another process count.
      tokenizer="",           # a .model (SentencePiece) or tokenizer.json, local or in a
                              # bucket; empty: the one in dir
      # Train-time image augmentation (eval: centre crop). The paper's setting.
      augment=dict(crop_scale=(0.4, 1.0), flip_prob=0.5),
      # The embedded data (data.dir empty): kind "shapes" (data/synthetic.py: learnt to its
      # floor in minutes) or "world" (data/world.py: `entities` named creatures picked with
      # popularity ~ rank^-zipf, for scaling studies). entities and zipf are read by "world" only.
      synthetic=dict(kind="shapes", train_docs=6000, eval_docs=300, seed=1234, entities=16384,
                     zipf=1.1),
  )
  c.train = dict(
      steps=300,
      batch_size=16,          # global, in sequences
      seed=0,
      # A Hugging Face Qwen3 / Llama folder (export/hf.py): a fresh run starts its text decoder
      # (embeddings, blocks, final norm, head) from it, e.g. late fusion from a pretrained LM.
      init_from_hf="",
      lr=3e-3,
      warmup_steps=30,
      schedule="inverse_sqrt",
      cooldown_fraction=0.2,
      weight_decay=0.1,
      b1=0.9,
      b2=0.95,
      clip_norm=1.0,
      log_every=10,
      # Compiled programs kept across runs (a restart skips the compile): a folder, relative to
      # the workdir unless absolute (a shared path serves every run); "" turns it off. A cache
      # already configured (JAX_COMPILATION_CACHE_DIR) is left as it is.
      compilation_cache="compile_cache",
      # (first, last): a jax.profiler trace of these steps into WORKDIR/profile (TensorBoard's
      # profile tab or Perfetto read it); () for none.
      profile_steps=(),
      # Compiler flags that overlap collectives with compute (nmm_jax/xla_flags.py): "auto"
      # adds the TPU and GPU presets to LIBTPU_INIT_ARGS / XLA_FLAGS (flags already set there
      # win); "none" leaves the environment alone. Read by nmm-train and nmm-compile at start-up.
      xla_flags="auto",
      microbatches=1,         # gradient accumulation: the batch runs as this many microbatches
                              # in one jitted step (peak memory falls; same update)
      loss_chunk=64,          # sequence positions per chunk of the fused LM head + loss
      device_prefetch=1,      # batches copied to the devices ahead of the step using them
                              # (train/device_prefetch.py: the copy overlaps the step); 0: none
  )
  c.eval = dict(
      every_steps=100,
      num_batches=4,          # held-out batches for the per-source eval loss
      # Caption accuracy (eval/captions.py): held-out pictures of `caption_source` captioned by
      # greedy decoding at each eval, scored per attribute where the documents carry the shapes
      # generator's attributes (the embedded data). 0: off.
      captions=32,
      caption_source="caption",
      max_new_tokens=12,
      show_captions=4,        # captions printed beside the truth when the run ends
  )
  # restore_step: resume from this step's checkpoint rather than the newest readable one (0:
  # the newest; an unreadable latest one is moved aside to checkpoints/unreadable-<step>).
  c.checkpoint = dict(every_steps=100, keep=3, async_save=True, restore_step=0)
  return c


def with_values(config: ml_collections.ConfigDict, **values) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted keys set: with_values(c, **{"train.steps": 5})."""
  config = copy.deepcopy(config)
  for key, value in values.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """A run's saved config as a ConfigDict, over base_config(): keys added since the run was
  saved (model.attention, mesh.sequence_parallel, ...) read their defaults."""
  def merged(base, values):
    out = dict(base)
    for key, value in values.items():
      out[key] = (merged(base[key], value) if isinstance(value, dict)
                  and isinstance(base.get(key), dict) else value)
    return out
  return ml_collections.ConfigDict(merged(base_config().to_dict(), dict(saved)))


def _fail(key, message):
  raise ConfigError(f"config.{key}: {message}")


def _require(ok, key, message):
  if not ok:
    _fail(key, message)


def _positive_int(c, key):
  value = c
  for part in key.split("."):
    value = value[part]
  _require(isinstance(value, int) and value > 0, key, f"must be a positive integer, got {value!r}")
  return value


def vision_head_dim(v) -> int:
  """The ViT's head size: model.vision.head_dim, or (0) its width split over its heads."""
  return v.head_dim or v.d_model // v.num_heads


def vision_layer_plan(cfg):
  """Late fusion, from the model config: (encoder layers feeding the connector,
  [(encoder layer, decoder layer)] injected inside), encoder layer indices made non-negative.
  The model builds from it and scaling/flops.py counts from it."""
  depth = cfg.vision.num_layers
  layers = [j % depth for j in cfg.vision_layers]
  if cfg.vision_fusion == "none":
    return (depth - 1,), []
  if cfg.vision_fusion == "input_concat":
    return tuple(layers), []
  return (layers[-1],), list(zip(layers[:-1], cfg.fusion_decoder_layers))


def _validate_moe(c):
  moe = c.model.moe
  _require(isinstance(moe.num_experts, int) and moe.num_experts >= 0, "model.moe.num_experts",
           f"must be a non-negative integer (0: dense), got {moe.num_experts!r}")
  if not moe.num_experts:
    return
  _require(isinstance(moe.top_k, int) and 1 <= moe.top_k <= moe.num_experts, "model.moe.top_k",
           f"must be in [1, num_experts={moe.num_experts}], got {moe.top_k!r}")
  _require(moe.routing in ("learned", "modality"), "model.moe.routing",
           f"must be 'learned' or 'modality', got {moe.routing!r}")
  if moe.routing == "modality":
    _require(moe.num_experts % 2 == 0 and moe.top_k <= moe.num_experts // 2, "model.moe.routing",
             f"'modality' splits the experts in two halves: needs an even num_experts and "
             f"top_k <= num_experts / 2, got {moe.num_experts} and {moe.top_k}")
  _require(moe.balance in MOE_BALANCES, "model.moe.balance",
           f"must be one of {MOE_BALANCES}, got {moe.balance!r}")
  _require(moe.grouped_matmul in MOE_GROUPED_MATMULS, "model.moe.grouped_matmul",
           f"must be one of {MOE_GROUPED_MATMULS}, got {moe.grouped_matmul!r}")
  _require(moe.exchange in MOE_EXCHANGES, "model.moe.exchange",
           f"must be one of {MOE_EXCHANGES}, got {moe.exchange!r}")
  _require(isinstance(moe.normalize_topk, bool), "model.moe.normalize_topk",
           f"must be True or False, got {moe.normalize_topk!r}")
  for key in ("capacity_factor", "load_balance_weight", "z_loss_weight", "bias_update_rate"):
    _require(moe[key] >= 0, f"model.moe.{key}", f"must be >= 0, got {moe[key]}")
  _require(moe.exchange_capacity == 0 or moe.exchange_capacity >= 1, "model.moe.exchange_capacity",
           f"must be 0 (the worst case: nothing dropped) or >= 1 (multiples of a device's own "
           f"assignments), got {moe.exchange_capacity}")
  _require(isinstance(moe.num_shared_experts, int) and moe.num_shared_experts >= 0,
           "model.moe.num_shared_experts",
           f"must be a non-negative integer, got {moe.num_shared_experts!r}")
  _require(isinstance(moe.every, int) and moe.every >= 1, "model.moe.every",
           f"must be a positive integer, got {moe.every!r}")
  first = moe.first_dense_layers
  _require(isinstance(first, int) and 0 <= first < c.model.num_layers and first % moe.every == 0,
           "model.moe.first_dense_layers",
           f"must be a multiple of model.moe.every={moe.every} in [0, model.num_layers="
           f"{c.model.num_layers}), got {first!r}")
  _require((c.model.num_layers - first) % moe.every == 0, "model.moe.every",
           f"must divide model.num_layers - model.moe.first_dense_layers = "
           f"{c.model.num_layers - first} (layers every-1, 2*every-1, ... after the dense ones are "
           f"MoE), got {moe.every!r}")
  if c.model.fusion == "late" and c.model.vision_fusion in ("internal_add", "internal_xattn"):
    targets = tuple(c.model.fusion_decoder_layers)
    _require(all(isinstance(t, int) and (t < first or (t - first) % moe.every == 0)
                 for t in targets),
             "model.fusion_decoder_layers",
             f"with model.moe.every={moe.every} the fusion points after the first "
             f"{first} dense layers must be {first} + a multiple of it (the decoder scans groups "
             f"of {moe.every} layers), got {targets}")


def _validate_late_fusion(c):
  m, d, v = c.model, c.data, c.model.vision
  for key in ("d_model", "num_layers", "num_heads", "mlp_dim", "num_patches"):
    _positive_int(c, f"model.vision.{key}")
  _require(isinstance(v.head_dim, int) and v.head_dim >= 0, "model.vision.head_dim",
           f"must be an int >= 0 (0: d_model / num_heads), got {v.head_dim!r}")
  _require(v.head_dim or v.d_model % v.num_heads == 0, "model.vision.num_heads",
           f"must divide model.vision.d_model={v.d_model} unless model.vision.head_dim is set, "
           f"got {v.num_heads}")
  patches = (d.image_size // m.patch_size) ** 2
  _require(v.num_patches == patches, "model.vision.num_patches",
           f"must be (data.image_size / model.patch_size)^2 = {patches}, got {v.num_patches}")
  _require(v.lr_scale >= 0, "model.vision.lr_scale", f"must be >= 0, got {v.lr_scale}")
  _require(m.vision_fusion in VISION_FUSIONS, "model.vision_fusion",
           f"must be one of {VISION_FUSIONS}, got {m.vision_fusion!r}")
  layers = tuple(m.vision_layers)
  _require(layers and all(isinstance(j, int) and -v.num_layers <= j < v.num_layers
                          for j in layers)
           and len({j % v.num_layers for j in layers}) == len(layers), "model.vision_layers",
           f"must be distinct layer indices in [-{v.num_layers}, {v.num_layers}), got {layers}")
  targets = tuple(m.fusion_decoder_layers)
  if m.vision_fusion in ("internal_add", "internal_xattn"):
    _require(len(layers) >= 2, "model.vision_layers",
             f"{m.vision_fusion} needs at least 2 layers (the last is the input), got {layers}")
    _require(len(targets) == len(layers) - 1 and len(set(targets)) == len(targets)
             and all(isinstance(t, int) and 0 <= t < m.num_layers for t in targets),
             "model.fusion_decoder_layers",
             f"needs {len(layers) - 1} distinct decoder layers in [0, {m.num_layers}) (one per "
             f"model.vision_layers entry but the last), got {targets}")
    _require(m.d_model % m.num_heads == 0, "model.num_heads",
             f"must divide model.d_model={m.d_model} for the fusion blocks")
  else:
    _require(not targets, "model.fusion_decoder_layers",
             f"is only used by internal_add / internal_xattn, got {targets}")


DCN_AXES = ("data", "fsdp")


def _validate_synthetic(c):
  s = c.data.synthetic
  _require(s.kind in SYNTHETIC_KINDS, "data.synthetic.kind",
           f"must be one of {SYNTHETIC_KINDS}, got {s.kind!r}")
  for key in ("train_docs", "eval_docs"):
    _positive_int(c, f"data.synthetic.{key}")
  if s.kind == "world" and not c.data.dir:
    _require(isinstance(s.entities, int) and 2 <= s.entities <= 128 ** 2, "data.synthetic.entities",
             f"must be an integer in [2, {128 ** 2}] (two-syllable names), got {s.entities!r}")
    _require(isinstance(s.zipf, (int, float)) and s.zipf >= 0, "data.synthetic.zipf",
             f"must be a number >= 0, got {s.zipf!r}")
    # A portrait is a 4x4 glyph scaled to the image.
    _require(c.data.image_size % 4 == 0, "data.image_size",
             f"must be a multiple of 4 for the world's portraits, got {c.data.image_size}")


def _validate_attention(c):
  m = c.model
  _require(m.attention in ATTENTION_IMPLEMENTATIONS, "model.attention",
           f"must be one of {ATTENTION_IMPLEMENTATIONS}, got {m.attention!r}")
  for key in ("flash_block_q", "flash_block_k"):
    block = m[key]
    _require(isinstance(block, int) and (block == 0 or (block >= 128 and block & (block - 1) == 0)),
             f"model.{key}", f"must be 0 (the platform's default) or a power of two >= 128 "
             f"(TPU tiles are multiples of 128, Triton's powers of two), got {block!r}")
  _require(m.attention != "cudnn" or m.dtype == "bfloat16", "model.attention",
           f"'cudnn' (cuDNN's fused attention) takes bf16, not model.dtype={m.dtype!r}")
  # Flash attention runs on each device's own heads; validate() already requires mesh.tensor to
  # divide both head counts, so each device's query heads are the ones its kv heads serve.


def sharding_rules(config) -> tuple:
  """The logical-axis rules a program of `config` is traced with: config.sharding_rules, after
  the sequence-parallel rule when mesh.sequence_parallel is on (the first matching rule wins)."""
  rules = tuple(config.sharding_rules)
  return (*SEQUENCE_PARALLEL_RULES, *rules) if config.mesh.sequence_parallel else rules


def dcn_shape(mesh_cfg) -> dict:
  """{axis: parts across slices / hosts} from mesh.dcn_* (sharding.make_mesh's dcn_shape)."""
  return {axis: mesh_cfg.get(f"dcn_{axis}", 1) for axis in DCN_AXES}


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> dict:
  """Mesh axis sizes with the one -1 replaced by the devices left over."""
  sizes = {axis: mesh_cfg[axis] for axis in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  for axis, size in sizes.items():
    _require(isinstance(size, int) and (size > 0 or size == -1), f"mesh.{axis}",
             f"must be a positive integer or -1, got {size!r}")
  _require(len(free) <= 1, "mesh", f"only one axis may be -1, got {free}")
  fixed = 1
  for axis, size in sizes.items():
    if size != -1:
      fixed *= size
  if free:
    _require(num_devices % fixed == 0, f"mesh.{free[0]}",
             f"the fixed axes {sizes} use {fixed} devices, which does not divide the "
             f"{num_devices} devices available")
    sizes[free[0]] = num_devices // fixed
  total = 1
  for size in sizes.values():
    total *= size
  _require(total == num_devices, "mesh",
           f"{sizes} needs {total} devices but {num_devices} are available")
  return sizes


def validate(c: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> dict:
  """Checks every value the run depends on; returns the resolved mesh shape."""
  m = c.model
  _require(m.fusion in FUSIONS, "model.fusion", f"must be one of {FUSIONS}, got {m.fusion!r}")
  for key in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "mlp_dim", "patch_size", "num_channels"):
    _positive_int(c, f"model.{key}")
  _require(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
           f"must divide model.num_heads={m.num_heads}, got {m.num_kv_heads}")
  _require(m.head_dim % 2 == 0, "model.head_dim", f"must be even for RoPE, got {m.head_dim}")
  _require(m.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {m.dtype!r}")
  # bf16 parameters would mean bf16 optimizer moments and updates rounded away (no f32 master
  # copy); model.dtype=bfloat16 computes in bf16 from f32 parameters instead.
  _require(m.param_dtype == "float32", "model.param_dtype",
           f"must be 'float32' (parameters and optimizer moments are the f32 master copy; "
           f"model.dtype='bfloat16' gives bf16 compute), got {m.param_dtype!r}")
  _require(m.remat in REMATS, "model.remat", f"must be one of {REMATS}, got {m.remat!r}")
  _validate_attention(c)
  _positive_int(c, "model.scan_unroll")
  if m.fusion == "late":
    _validate_late_fusion(c)
  _validate_moe(c)

  d = c.data
  for key in ("seq_len", "image_size", "max_images", "num_packing_bins"):
    _positive_int(c, f"data.{key}")
  _require(d.image_size % m.patch_size == 0, "data.image_size",
           f"must be a multiple of model.patch_size={m.patch_size}, got {d.image_size}")
  for key in ("num_workers", "prefetch", "streams"):
    _require(isinstance(d[key], int) and d[key] >= 0, f"data.{key}",
             f"must be a non-negative integer, got {d[key]!r}")
  lo_hi = tuple(d.augment.crop_scale)
  _require(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1] <= 1, "data.augment.crop_scale",
           f"must be (low, high) with 0 < low <= high <= 1, got {lo_hi}")
  _require(0 <= d.augment.flip_prob <= 1, "data.augment.flip_prob",
           f"must be in [0, 1], got {d.augment.flip_prob}")
  _validate_synthetic(c)
  weights = dict(d.mixture)
  _require(weights and all(isinstance(w, (int, float)) and w >= 0 for w in weights.values())
           and sum(weights.values()) > 0, "data.mixture",
           f"must map source names to non-negative weights with a positive sum, got {weights}")

  t = c.train
  for key in ("steps", "batch_size", "log_every", "loss_chunk", "microbatches"):
    _positive_int(c, f"train.{key}")
  _require(d.seq_len % t.loss_chunk == 0, "train.loss_chunk",
           f"must divide data.seq_len={d.seq_len}, got {t.loss_chunk}")
  _require(isinstance(t.warmup_steps, int) and 0 <= t.warmup_steps <= t.steps, "train.warmup_steps",
           f"must be an integer in [0, train.steps={t.steps}], got {t.warmup_steps!r}")
  _require(t.lr > 0, "train.lr", f"must be positive, got {t.lr}")
  _require(isinstance(t.device_prefetch, int) and t.device_prefetch >= 0, "train.device_prefetch",
           f"must be an integer >= 0, got {t.device_prefetch!r}")
  _require(t.xla_flags in xla_flags.PRESETS, "train.xla_flags",
           f"must be one of {', '.join(xla_flags.PRESETS)}, got {t.xla_flags!r}")
  profile = tuple(t.profile_steps)
  _require(not profile or (len(profile) == 2 and all(isinstance(s, int) for s in profile)
                           and 1 <= profile[0] <= profile[1] <= t.steps), "train.profile_steps",
           f"must be () or (first, last) with 1 <= first <= last <= train.steps={t.steps}, "
           f"got {profile!r}")
  _require(t.schedule in SCHEDULES, "train.schedule",
           f"must be one of {SCHEDULES}, got {t.schedule!r}")
  _require(0 <= t.cooldown_fraction <= 1, "train.cooldown_fraction",
           f"must be in [0, 1], got {t.cooldown_fraction}")
  _require(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
  _require(0 <= t.b1 < 1 and 0 <= t.b2 < 1, "train.b1/b2", f"must be in [0, 1), got {t.b1}, {t.b2}")
  _require(t.clip_norm > 0, "train.clip_norm", f"must be positive, got {t.clip_norm}")
  # train.init_from_hf (a folder to read) is checked by export/hf.py's check_init_from, which
  # the loop calls right after this.
  _positive_int(c, "eval.every_steps")
  _positive_int(c, "eval.num_batches")
  _positive_int(c, "eval.max_new_tokens")
  for key in ("captions", "show_captions"):
    _require(isinstance(c.eval[key], int) and c.eval[key] >= 0, f"eval.{key}",
             f"must be an integer >= 0, got {c.eval[key]!r}")
  _positive_int(c, "checkpoint.every_steps")
  _positive_int(c, "checkpoint.keep")
  _require(isinstance(c.checkpoint.restore_step, int) and c.checkpoint.restore_step >= 0,
           "checkpoint.restore_step",
           f"must be a step number (0: the newest readable), got {c.checkpoint.restore_step!r}")

  for rule in c.sharding_rules:
    _require(len(rule) == 2 and isinstance(rule[0], str), "sharding_rules",
             f"each rule must be (logical axis, mesh axes), got {rule!r}")
    unknown = [a for a in mesh_axes_of(rule[1]) if a not in MESH_AXES]
    _require(not unknown, "sharding_rules",
             f"rule {tuple(rule)!r} names {unknown}, not mesh axes {MESH_AXES}")
  mesh = resolve_mesh_shape(c.mesh, num_devices)
  _require(isinstance(c.mesh.sequence_parallel, bool), "mesh.sequence_parallel",
           f"must be True or False, got {c.mesh.sequence_parallel!r}")
  for axis, parts in dcn_shape(c.mesh).items():
    _require(isinstance(parts, int) and parts > 0 and mesh[axis] % parts == 0,
             f"mesh.dcn_{axis}", f"must be a positive integer dividing mesh.{axis}="
             f"{mesh[axis]} (the slices or hosts that axis spans), got {parts!r}")
  shards = batch_shards(c.sharding_rules, mesh)
  _require(t.batch_size % shards == 0, "train.batch_size",
           f"{t.batch_size} is not divisible by the batch-sharding mesh axes "
           f"{'*'.join(batch_axes(c.sharding_rules))} = {shards}")
  _require(t.batch_size % (shards * t.microbatches) == 0, "train.microbatches",
           f"{t.microbatches} microbatches of train.batch_size={t.batch_size} do not each split "
           f"over the {shards} batch shards (batch_size must be a multiple of "
           f"microbatches x {shards})")
  # Each process feeds its own rows to its own devices, but the devices of one tensor-parallel
  # group need the same rows: each group must sit inside one process (mesh order: tensor and
  # expert are the innermost axes, so whole groups are runs of tensor x expert devices).
  local = num_devices // num_processes
  _require(mesh["tensor"] == 1 or local % (mesh["tensor"] * mesh["expert"]) == 0, "mesh.tensor",
           f"{mesh['tensor']}-way tensor parallelism spans processes ({local} device(s) per "
           f"process): one process per GPU cannot feed a tensor group the same rows; start one "
           f"process per host driving all its GPUs (nmm-train without --local_device_ids; "
           f"sbatch --ntasks-per-node=1 launch/slurm.sbatch) or set mesh.tensor=1")
  _require(t.batch_size % num_processes == 0, "train.batch_size",
           f"{t.batch_size} is not divisible by the {num_processes} processes")
  streams = d.streams or num_processes
  _require(streams % num_processes == 0, "data.streams",
           f"{d.streams} is not a multiple of the {num_processes} processes")
  _require(t.batch_size % streams == 0, "train.batch_size",
           f"{t.batch_size} is not divisible by the {streams} data streams")
  for axis, dim_key in (("tensor", "num_heads"), ("tensor", "num_kv_heads"), ("tensor", "mlp_dim"),
                        ("tensor", "vocab_size"), ("fsdp", "d_model")):
    size = getattr(m, dim_key)
    # The fsdp axis has a fix that keeps every device busy: shard over the largest divisor of
    # both and data-parallelise the rest.
    fix = (f"; e.g. --config.mesh.fsdp={math.gcd(size, mesh['fsdp'])} --config.mesh.data=-1"
           if axis == "fsdp" else "")
    _require(size % mesh[axis] == 0, f"model.{dim_key}",
             f"{size} is not divisible by mesh.{axis}={mesh[axis]}{fix}")
  if m.moe.num_experts:
    _require(m.moe.num_experts % mesh["expert"] == 0, "model.moe.num_experts",
             f"{m.moe.num_experts} is not divisible by mesh.expert={mesh['expert']} (each "
             f"device on that axis holds the same number of experts)")
  return mesh


# Keys whose change makes a checkpoint's data-iterator state unusable: Grain worker processes each
# hold part of the state. data.prefetch and train.device_prefetch may change: the saved state is
# the position of the next batch a step consumes, whatever was buffered ahead of it.
RESUME_FIXED_KEYS = ("data.num_workers",)


def check_resumable(saved: dict, config):
  """Raises ConfigError when `config` cannot resume a checkpoint saved with `saved`."""
  for key in RESUME_FIXED_KEYS:
    old, new = saved, config
    for part in key.split("."):
      old, new = old.get(part) if isinstance(old, dict) else None, new[part]
    if old is not None and old != new:
      _fail(key, f"is {new!r} but the checkpoint to resume was written with {old!r}; the data "
                 f"iterator state depends on it, so resume with {old!r} (or use a new workdir)")
