"""Caption accuracy during training: the same held-out pictures captioned at every eval."""
import os

from absl import logging

from nmm_jax.eval import captions, held_out
from nmm_jax.eval.inference import InferenceModel


class TrainingCaptionEval:
  """Captions `eval.captions` held-out pictures with the current parameters; `last` keeps the
  latest result (the run prints a few of its captions when it ends)."""

  def __init__(self, config, model: InferenceModel, examples):
    self.config, self.model, self.examples, self.last = config, model, examples, None

  @classmethod
  def create(cls, config, directory: str, tokenizer, mesh):
    """None when it is off, or when the source's documents carry no attributes to score."""
    e = config.eval
    if not e.captions:
      return None
    if not os.path.isdir(os.path.join(directory, e.caption_source)):
      logging.warning("caption accuracy off: %s has no source %r (eval.caption_source)",
                      directory, e.caption_source)
      return None
    examples = captions.with_attributes(held_out.caption_examples(
        directory, e.caption_source, config.data.image_size, limit=e.captions))
    if not examples:
      logging.warning("caption accuracy off: the %r eval documents carry no shape attributes "
                      "(only the embedded shapes data has them)", e.caption_source)
      return None
    return cls(config, InferenceModel(config, None, tokenizer, mesh), examples)

  def __call__(self, params) -> dict:
    """{"eval/caption/<attribute>": accuracy} for these parameters."""
    self.model.params = params
    try:
      self.last = captions.caption_accuracy(self.model, self.examples,
                                            max_new_tokens=self.config.eval.max_new_tokens)
    finally:
      self.model.params = None  # the train step donates the parameters' buffers
    return {f"eval/caption/{k}": v for k, v in self.last.accuracy.items()}

  def summary(self) -> str:
    """The first `eval.show_captions` captions of the last eval beside the truth."""
    if self.last is None or not self.config.eval.show_captions:
      return ""
    rows = self.last.captions[:self.config.eval.show_captions]
    width = max(len(generated) for generated, _ in rows)
    return "\n".join(["held-out captions (generated | truth):"]
                     + [f"  {generated:<{width}} | {truth}" for generated, truth in rows])
