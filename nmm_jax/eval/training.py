"""The evaluators a training run calls at every eval step, built from the config in this one
place: the loop calls each with the current parameters and knows none by name.

An evaluator is a callable `params -> {metric name: value}` with `summary() -> str` (what the run
prints when it ends; "" for nothing). The held-out loss is the train program's own eval step and
is not one of them.
"""
from nmm_jax.eval.caption_eval import TrainingCaptionEval


def training_evaluators(config, directory: str, tokenizer, mesh) -> list:
  """The evaluators `config.eval` turns on, for the data in `directory`."""
  evaluators = [TrainingCaptionEval.create(config, directory, tokenizer, mesh)]
  return [e for e in evaluators if e is not None]
