r"""nmm-generate: text from a trained run, or the log-probabilities of a text.

  nmm-generate --workdir=DIR [--step=N] [--image=PATH ...] [--prompt=TEXT] --max-new-tokens=K
               [--temperature=0] [--top-p=1] [--num-samples=1] [--seed=0]
  nmm-generate --workdir=DIR [--step=N] --score=TEXT [--image=PATH ...] [--eos]

The prompt is laid out as training lays out documents: <bos>, each image (eval view: centre crop
at the run's resolution), then the prompt text. With no prompt text the model captions the
images (the caption source's layout). Decoding uses a key/value cache; temperature 0 is greedy,
otherwise tokens are sampled from softmax(logits / T) cut to top-p. --num-samples continues the
prompt that many times in one batch and prints one line each.

--score prints one JSON object: the text's token ids, their strings, each token's
log-probability given everything before it, and the sum (with --eos, <eos> is scored after the
text). Exported models (nmm-export) can be compared with it token by token.
Flags may be spelt with dashes or underscores.
"""
import json
import sys

from absl import app, flags

from nmm_jax.eval.run_model import load_run
from nmm_jax.eval.sequences import load_image
from nmm_jax.subcommands import reporting_errors

flags.DEFINE_string("workdir", None, "The training run's folder (holds checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_multi_string("image", [], "Image file(s), in prompt order.")
flags.DEFINE_string("prompt", "", "Text after the images.")
flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate at most.")
flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sampling temperature.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: keep the most likely tokens up to this mass.")
flags.DEFINE_integer("num_samples", 1, "Continuations of the prompt, decoded as one batch.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("score", None, "Score this text (after the images) instead of generating.")
flags.DEFINE_bool("eos", False, "With --score: also score <eos> after the text.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]} (flags are --name=value)")
  if FLAGS.num_samples < 1:
    raise ValueError(f"--num_samples={FLAGS.num_samples}: must be at least 1")
  model = load_run(FLAGS.workdir, FLAGS.step)
  images = [load_image(path, model.image_size) for path in FLAGS.image]
  if FLAGS.score is not None:
    sequence = model.sequence(images, FLAGS.score, eos=FLAGS.eos)
    ids, logprobs = model.score([sequence])[0]
    print(json.dumps({"step": model.step, "tokens": ids.tolist(),
                      "pieces": [model.tokenizer.decode([i]) or f"<{i}>" for i in ids],
                      "logprobs": logprobs.tolist(), "sum": float(logprobs.sum())}))
    return
  sequence = model.sequence(images, FLAGS.prompt)
  outputs = model.generate([sequence] * FLAGS.num_samples, FLAGS.max_new_tokens,
                           temperature=FLAGS.temperature, top_p=FLAGS.top_p, seed=FLAGS.seed)
  for out in outputs:
    print(out.text)


def underscored(argv: list[str]) -> list[str]:
  """--max-new-tokens=K -> --max_new_tokens=K (the flag name only)."""
  out = []
  for arg in argv:
    if arg.startswith("--"):
      name, eq, value = arg[2:].partition("=")
      arg = "--" + name.replace("-", "_") + eq + value
    out.append(arg)
  return out


def run():
  sys.argv = underscored(sys.argv)
  app.run(reporting_errors("nmm-generate", main))


if __name__ == "__main__":
  run()
