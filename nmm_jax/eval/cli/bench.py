"""nmm-eval bench: generation speed of a config's model (random weights), batched, KV cache.

  nmm-eval bench --config=configs/bench.py [--batch=8] [--prompt_len=128] [--new_tokens=64]
                 [--images=0]

Times the jitted generation (prefill + decode scan) for 1 and for --new_tokens new tokens; their
difference is the decode time. Prints prefill time, decode ms per step, decoded tokens/s, peak
memory; the last line is one JSON object.
"""
import json
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from nmm_jax.eval.inference import InferenceModel
from nmm_jax.eval.sequences import build_sequence
from nmm_jax.hardware import peak_memory_bytes

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench.py", "Model config.",
                                          lock_config=True)
flags.DEFINE_integer("batch", 8, "Prompts decoded together.")
flags.DEFINE_integer("prompt_len", 128, "Prompt tokens (images included).")
flags.DEFINE_integer("new_tokens", 64, "Tokens generated per prompt.")
flags.DEFINE_integer("images", 0, "Images at the start of each prompt.")
flags.DEFINE_integer("repeats", 3, "Timed calls (the median is reported).")
FLAGS = flags.FLAGS


class _RandomTokenizer:
  """Special ids 0-5, every other id a text token; nothing stops generation early."""
  pad_id, bos_id, eos_id, image_id, image_start_id, image_end_id = 0, 1, -1, 3, 4, 5
  non_text_ids = (0, 3, 4, 5)

  def __init__(self, vocab_size):
    self.vocab_size = vocab_size

  def decode(self, ids):
    return ""


def _median_seconds(fn, repeats):
  fn()  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv):
  del argv
  config = _CONFIG.value
  model = InferenceModel.initialised(config, _RandomTokenizer(config.model.vocab_size))
  rng = np.random.default_rng(0)
  size = config.data.image_size
  images = rng.integers(0, 256, (FLAGS.images, size, size, 3))
  text = FLAGS.prompt_len - 1 - FLAGS.images * (model.patches_per_image + 2)
  if text < 1:
    raise ValueError(f"--prompt_len={FLAGS.prompt_len} does not hold {FLAGS.images} images")
  prompts = [build_sequence(model.tokenizer, images, rng.integers(6, config.model.vocab_size,
                                                                  text), model.patches_per_image)
             for _ in range(FLAGS.batch)]
  one = _median_seconds(lambda: model.generate(prompts, 1), FLAGS.repeats)
  full = _median_seconds(lambda: model.generate(prompts, FLAGS.new_tokens), FLAGS.repeats)
  step_s = (full - one) / (FLAGS.new_tokens - 1)
  memory, memory_kind = peak_memory_bytes()
  device = jax.devices()[0]
  result = {"device": device.device_kind, "fusion": config.model.fusion,
            "moe_experts": config.model.moe.num_experts, "batch": FLAGS.batch,
            "prompt_len": FLAGS.prompt_len, "new_tokens": FLAGS.new_tokens,
            "images": FLAGS.images, "prefill_and_first_token_s": one, "generate_s": full,
            "decode_step_ms": step_s * 1e3, "decode_tokens_per_s": FLAGS.batch / step_s,
            "peak_memory_bytes": int(memory), "peak_memory_kind": memory_kind}
  print(f"prefill + 1 token {one * 1e3:.1f} ms | {FLAGS.new_tokens} tokens {full * 1e3:.1f} ms "
        f"| decode step {step_s * 1e3:.2f} ms | {FLAGS.batch / step_s:.0f} decoded tokens/s | "
        f"peak memory {memory / 2**30:.2f} GiB ({memory_kind})")
  print(json.dumps(result))
