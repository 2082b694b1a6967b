r"""nmm-export: a training run's checkpoint as files other frameworks read.

  nmm-export --workdir=DIR [--step=N] --format=safetensors --out=OUT
  nmm-export --workdir=DIR [--step=N] --format=hf --out=OUT
  nmm-export --workdir=DIR [--step=N] --format=torch --out=OUT
  nmm-export --workdir=DIR [--step=N] --format=hf-multimodal --out=OUT

safetensors: every parameter, named by its path in the model ("decoder.blocks.attn.w_q_DxHxE";
stacked layers on the leading axis, shape letters in the name as in the model code), in
OUT/model.safetensors, with OUT/nmm_config.json (model family and sizes, data settings,
tokenizer file) and the run's tokenizer file.

hf: the text decoder as a Hugging Face Qwen3ForCausalLM (QK-norm on) or LlamaForCausalLM
folder (config.json, model.safetensors, the tokenizer when the run has a tokenizer.json);
`transformers.AutoModelForCausalLM.from_pretrained(OUT)` loads it. An MoE decoder with learned,
dropless routing balanced by the aux loss and no shared experts becomes Qwen3MoeForCausalLM;
other MoE decoders are refused with a message naming the key.

torch: the safetensors export plus nmm_torch.py, a pure-PyTorch reference of every model family
(early, late in each vision_fusion mode, MoE): `nmm_torch.load(OUT)` in that folder needs only
torch and safetensors.

hf-multimodal: the whole model (every family: early, late in each vision_fusion mode, MoE) as
a Hugging Face remote-code folder: AutoModelForCausalLM / AutoProcessor.from_pretrained(OUT,
trust_remote_code=True) load it with transformers and torch only (nmm_torch.py's math), and
greedy generate() gives nmm_jax's tokens.

Only the parameters are read from the checkpoint (not the optimizer state), and tensors are
written one at a time: peak host memory is about one copy of the model.
"""
from absl import app, flags

from nmm_jax.export.exporter import export
from nmm_jax.subcommands import reporting_errors

flags.DEFINE_string("workdir", None, "The training run's folder (holds checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_enum("format", None, ["safetensors", "hf", "torch", "hf-multimodal"],
                  "What to write.")
flags.DEFINE_string("out", None, "Output folder (created; must be empty or absent).")
flags.mark_flags_as_required(["workdir", "format", "out"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  export(FLAGS.workdir, FLAGS.out, FLAGS.format, FLAGS.step)


def run():
  app.run(reporting_errors("nmm-export", main))


if __name__ == "__main__":
  run()
