"""Tokenizers. The embedded data uses a closed word-level vocabulary saved as JSON beside the shards.

Every tokenizer exposes the same special ids, which the pipeline and the model rely on.
"""
import json
import os

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<image>", "<image_start>", "<image_end>", "<unk>")
PAD, BOS, EOS, IMAGE, IMAGE_START, IMAGE_END, UNK = range(len(SPECIAL_TOKENS))
# Targets the loss never scores: padding and the image markers (loss is on text only).
NON_TEXT_IDS = (PAD, IMAGE, IMAGE_START, IMAGE_END)


class WordTokenizer:
  """Whitespace-split words of a fixed vocabulary; unknown words map to <unk>."""

  def __init__(self, words):
    self.vocab = list(SPECIAL_TOKENS) + [w for w in words if w not in SPECIAL_TOKENS]
    self._ids = {w: i for i, w in enumerate(self.vocab)}

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def encode(self, text: str) -> list[int]:
    return [self._ids.get(w, UNK) for w in text.split()]

  def decode(self, ids) -> str:
    return " ".join(self.vocab[i] for i in ids if i >= len(SPECIAL_TOKENS) or i == UNK)

  def save(self, path: str):
    with open(path, "w") as f:
      json.dump({"type": "word", "vocab": self.vocab}, f)

  @classmethod
  def load(cls, path: str) -> "WordTokenizer":
    if not os.path.exists(path):
      raise FileNotFoundError(f"tokenizer file {path} does not exist")
    with open(path) as f:
      spec = json.load(f)
    if spec.get("type") != "word" or tuple(spec["vocab"][:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
      raise ValueError(f"{path} is not a word tokenizer with the expected special tokens")
    return cls(spec["vocab"][len(SPECIAL_TOKENS):])
