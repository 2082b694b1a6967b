"""nmm-eval: what a trained run can do, measured on held-out data.

  nmm-eval captions --workdir=DIR [--step=N] [--num=300]      caption accuracy per attribute
  nmm-eval zero-shot --workdir=DIR --source=digits [--num=0]  classification by likelihood
  nmm-eval bench --config=configs/bench.py [--batch=8]        generation speed (KV cache)

`nmm-eval COMMAND --help` lists a command's flags. Generation and scoring of single prompts:
nmm-generate.
"""
from nmm_jax.subcommands import dispatch

COMMANDS = {
    "captions": "nmm_jax.eval.cli.captions",
    "zero-shot": "nmm_jax.eval.cli.zero_shot",
    "bench": "nmm_jax.eval.cli.bench",
}


def run():
  dispatch("nmm-eval", COMMANDS, __doc__)


if __name__ == "__main__":
  run()
