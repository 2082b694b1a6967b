"""Tokenizers: a SentencePiece model file (`*.model`) or a Hugging Face `tokenizer.json`.

Whatever the file, the pipeline needs the same special tokens; they are looked up by name, so a
tokenizer trained elsewhere works once these strings are in its vocabulary:

  <pad> <bos> <eos> <image> <image_start> <image_end>

The embedded shapes data uses a closed word-level vocabulary, written as a Hugging Face
`tokenizer.json` (`word_level_tokenizer`) from the generator's word list: no download, same file
every time. `train_sentencepiece` trains a SentencePiece model on text (`nmm-data train-tokenizer`).
"""
import io
import os
from typing import Iterable

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<image>", "<image_start>", "<image_end>")
UNK_TOKEN = "<unk>"


class Tokenizer:
  """Text <-> ids plus the special ids. Subclasses give `_encode`, `_decode`, `_id_of`.

  `require_specials=False` gives None for a special token the file lacks instead of refusing the
  file: for readers that report what a file has (the Hugging Face export's token ids), not for
  the pipeline, which needs every one."""

  def __init__(self, path: str, vocab_size: int, require_specials: bool = True):
    self.path, self.vocab_size = path, vocab_size
    ids = {}
    for token in SPECIAL_TOKENS:
      ids[token] = self._id_of(token)
      if ids[token] is None and require_specials:
        raise ValueError(f"tokenizer {path} has no special token {token!r}; the pipeline needs "
                         f"all of {', '.join(SPECIAL_TOKENS)}")
    (self.pad_id, self.bos_id, self.eos_id, self.image_id, self.image_start_id,
     self.image_end_id) = (ids[t] for t in SPECIAL_TOKENS)
    # Targets the loss never scores: padding and the image markers (loss is on text only).
    self.non_text_ids = (self.pad_id, self.image_id, self.image_start_id, self.image_end_id)

  def encode(self, text: str) -> list[int]:
    return self._encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    special = set(self.non_text_ids) | {self.bos_id, self.eos_id}
    return self._decode([int(i) for i in ids if int(i) not in special])


class HuggingFaceTokenizer(Tokenizer):
  def __init__(self, path: str, require_specials: bool = True):
    import tokenizers
    self._tok = tokenizers.Tokenizer.from_file(path)
    super().__init__(path, self._tok.get_vocab_size(with_added_tokens=True), require_specials)

  def _id_of(self, token):
    return self._tok.token_to_id(token)

  def _encode(self, text):
    return self._tok.encode(text, add_special_tokens=False).ids

  def _decode(self, ids):
    return self._tok.decode(ids)


class SentencePieceTokenizer(Tokenizer):
  def __init__(self, path: str, require_specials: bool = True):
    import sentencepiece
    self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
    super().__init__(path, self._sp.get_piece_size(), require_specials)

  def _id_of(self, token):
    i = self._sp.piece_to_id(token)
    return None if i == self._sp.unk_id() and token != UNK_TOKEN else i

  def _encode(self, text):
    return self._sp.encode(text)

  def _decode(self, ids):
    return self._sp.decode(ids)


def load_tokenizer(path: str, require_specials: bool = True) -> Tokenizer:
  """`*.model` -> SentencePiece; `*.json` -> Hugging Face tokenizers. `require_specials`: see
  Tokenizer."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer file {path} does not exist")
  if path.endswith(".model"):
    return SentencePieceTokenizer(path, require_specials)
  if path.endswith(".json"):
    return HuggingFaceTokenizer(path, require_specials)
  raise ValueError(f"tokenizer file {path}: expected a SentencePiece '.model' or a Hugging Face "
                   "'tokenizer.json'")


def word_level_tokenizer(words: Iterable[str], path: str):
  """Writes a Hugging Face word-level tokenizer.json: special tokens first (ids 0..6), then
  `words` in order. Deterministic: the same words give the same file."""
  import tokenizers
  from tokenizers import models, pre_tokenizers
  vocab = {}
  for token in SPECIAL_TOKENS + (UNK_TOKEN,) + tuple(words):
    vocab.setdefault(token, len(vocab))
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  tok.save(path)


def train_sentencepiece(texts: Iterable[str], path: str, *, vocab_size: int,
                        model_type: str = "unigram"):
  """Trains a SentencePiece model on `texts` and writes it to `path` (a `.model` file).

  Special-token ids: <pad> 0, <bos> 1, <eos> 2, <unk> 3, then the image markers. One thread,
  so the same texts give the same model.
  """
  import sentencepiece
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
      model_type=model_type, pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="<pad>",
      bos_piece="<bos>", eos_piece="<eos>", unk_piece=UNK_TOKEN,
      user_defined_symbols=list(SPECIAL_TOKENS[3:]), num_threads=1, hard_vocab_limit=False,
      minloglevel=2)
  with open(path, "wb") as f:
    f.write(model.getvalue())

