"""The processor of an nmm_jax model exported with `nmm-export --format=hf-multimodal`: images
and text -> the model's inputs, laid out as nmm_jax lays out a prompt (eval/sequences.py):

  <bos> [<image_start> <image>*P <image_end>]... text      (images first, positions from 0)

with image_ids (the image's index in its row, -1 for text) and patch_ids (row-major patch
index, -1 for text). Each image is nmm_jax's eval view (data/images.py: the shorter side's
centre square, resized bicubically to image_size), kept as uint8 [S, S, 3]: the model
normalises and patchifies. A batch is left-padded with <pad> (attention_mask 0 there), as
nmm_jax pads prompts for decoding. Needs transformers, PIL and numpy only.
"""
import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin

NO_IMAGE = -1
_MARKERS = ("<image>", "<image_start>", "<image_end>", "<bos>", "<pad>")


def eval_view(img: Image.Image, size: int) -> np.ndarray:
  """[size, size, 3] uint8: nmm_jax's data/images.py eval_view of an RGB image."""
  img = img.convert("RGB")
  side = min(img.width, img.height)
  left, top = (img.width - side) // 2, (img.height - side) // 2
  box = (left, top, left + side, top + side)
  if box == (0, 0, size, size):  # already square at the target size
    return np.asarray(img, np.uint8)
  return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC, box=box), np.uint8)


class NMMProcessor(ProcessorMixin):
  """`image_size`: the run's data.image_size; `patch_size`: model.patch_size."""

  def __init__(self, tokenizer=None, image_size: int = 0, patch_size: int = 1,
               chat_template=None):
    super().__init__(tokenizer, chat_template=chat_template)
    self.image_size, self.patch_size = image_size, patch_size

  @property
  def patches_per_image(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  def _ids(self):
    ids = {t: self.tokenizer.convert_tokens_to_ids(t) for t in _MARKERS}
    return ids

  def sequence(self, images, text: str):
    """(token ids, image ids, patch ids, [I, S, S, 3] uint8) of one prompt."""
    ids = self._ids()
    p = self.patches_per_image
    tokens, image_ids, patch_ids = [ids["<bos>"]], [NO_IMAGE], [NO_IMAGE]
    for i in range(len(images)):
      tokens += [ids["<image_start>"]] + [ids["<image>"]] * p + [ids["<image_end>"]]
      image_ids += [NO_IMAGE] + [i] * p + [NO_IMAGE]
      patch_ids += [NO_IMAGE] + list(range(p)) + [NO_IMAGE]
    text_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    tokens += text_ids
    image_ids += [NO_IMAGE] * len(text_ids)
    patch_ids += [NO_IMAGE] * len(text_ids)
    pixels = np.stack([eval_view(im, self.image_size) for im in images]) if len(images) else (
        np.zeros((0, self.image_size, self.image_size, 3), np.uint8))
    return tokens, image_ids, patch_ids, pixels

  def __call__(self, images=None, text=None, return_tensors="pt", **kwargs):
    """`images`: PIL images of one prompt (a list), or one list per prompt; `text`: a string or
    one per prompt. Returns input_ids, attention_mask, image_ids, patch_ids (LongTensors
    [B, L]) and, when any prompt has an image, pixel_values uint8 [B, I, S, S, 3] (I: the
    most images in a prompt; missing ones zero)."""
    single = text is None or isinstance(text, str)
    texts = [text or ""] if single else list(text)
    if images is None:
      images = [[] for _ in texts]
    elif isinstance(images, Image.Image):
      images = [[images]]
    elif single or (images and isinstance(images[0], Image.Image)):
      images = [list(images)]
    if len(images) != len(texts):
      raise ValueError(f"{len(images)} image lists for {len(texts)} texts")
    rows = [self.sequence(im, t) for im, t in zip(images, texts)]
    length = max(len(r[0]) for r in rows)
    most = max(len(r[3]) for r in rows)
    pad = self._ids()["<pad>"]
    out = {"input_ids": [], "attention_mask": [], "image_ids": [], "patch_ids": []}
    for tokens, image_ids, patch_ids, _ in rows:
      n = length - len(tokens)  # left padding: every row's next token at the same position
      out["input_ids"].append([pad] * n + tokens)
      out["attention_mask"].append([0] * n + [1] * len(tokens))
      out["image_ids"].append([NO_IMAGE] * n + image_ids)
      out["patch_ids"].append([NO_IMAGE] * n + patch_ids)
    out = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
    if most:
      pixels = np.zeros((len(rows), most, self.image_size, self.image_size, 3), np.uint8)
      for r, row in enumerate(rows):
        pixels[r, :len(row[3])] = row[3]
      out["pixel_values"] = torch.from_numpy(pixels)
    if return_tensors != "pt":
      out = {k: v.numpy() for k, v in out.items()}
    return BatchFeature(out)

  def batch_decode(self, *args, **kwargs):
    return self.tokenizer.batch_decode(*args, **kwargs)

  def decode(self, *args, **kwargs):
    return self.tokenizer.decode(*args, **kwargs)
