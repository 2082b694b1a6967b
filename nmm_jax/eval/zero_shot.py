"""Zero-shot classification by likelihood: each candidate caption is scored after the image, and
the most likely one is the prediction.

The candidates of a source are the distinct captions of its held-out pairs (the digits source:
"a handwritten digit zero" .. "nine"; the shapes captions: every colour x shape x count x region
that occurs), so the true caption is always among them. A caption is scored with its <eos>, the
way training scores it, so a caption that is a prefix of another is not favoured.
"""
import dataclasses

import numpy as np


@dataclasses.dataclass
class ZeroShotResult:
  accuracy: float
  chance: float          # 1 / number of candidates
  candidates: list
  predictions: list      # predicted candidate index per example
  labels: list           # true candidate index per example


def classify(model, images_NxSxSx3, candidates: list[str], batch_size: int = 0) -> np.ndarray:
  """[N, C] summed log-probabilities of each candidate caption (and its <eos>) after each image."""
  pairs = [model.sequence(image[None], text, eos=True)
           for image in images_NxSxSx3 for text in candidates]
  scored = model.score(pairs, batch_size=batch_size)
  return np.asarray([logprobs.sum() for _, logprobs in scored]).reshape(
      len(images_NxSxSx3), len(candidates))


def zero_shot_accuracy(model, examples, batch_size: int = 0) -> ZeroShotResult:
  """Accuracy of picking each example's own caption among the examples' distinct captions."""
  if not examples:
    raise ValueError("no held-out image-caption pairs to classify")
  candidates = sorted({e.caption for e in examples})
  if len(candidates) < 2:
    raise ValueError(f"the held-out captions are all {candidates[0]!r}: nothing to choose from")
  scores_NxC = classify(model, np.stack([e.image for e in examples]), candidates, batch_size)
  predictions = scores_NxC.argmax(axis=1)
  labels = np.asarray([candidates.index(e.caption) for e in examples])
  return ZeroShotResult(float(np.mean(predictions == labels)), 1 / len(candidates), candidates,
                        predictions.tolist(), labels.tolist())
