"""nmm-data inspect: what is in some shards.

  nmm-data inspect DATA_DIR [--tokenizer=FILE] [--contact_sheet=sheet.png --num_documents=8]

Prints per source: documents, unreadable records, images per document, image sizes, text
characters and (with a tokenizer: --tokenizer, or one found beside the shards) text tokens per
document and sequence length with images at --patches_per_image tokens each.
"""
import collections
import itertools
import textwrap

import numpy as np
from absl import flags
from PIL import Image, ImageDraw, ImageFont

from nmm_jax.data import images
from nmm_jax.data.records import ImageSegment
from nmm_jax.data.shards import expand_shards, find_tokenizer, iter_documents
from nmm_jax.data.tokenizer import load_tokenizer

flags.DEFINE_string("split", "", "Only shards of this split (train/eval); default all.")
flags.DEFINE_string("tokenizer", "", "Tokenizer for token counts (default: one beside the shards).")
flags.DEFINE_integer("patches_per_image", 16, "Image tokens per image in the sequence-length "
                     "statistics ((image_size / patch_size)^2; the paper's 224/14: 256).")
flags.DEFINE_integer("max_per_shard", 0, "Read at most this many records per shard (0: all).")
flags.DEFINE_string("contact_sheet", "", "Write a PNG of the first --num_documents documents.")
flags.DEFINE_integer("num_documents", 8, "Documents on the contact sheet.")
FLAGS = flags.FLAGS


class SourceStats:

  def __init__(self):
    self.documents, self.bad = 0, 0
    self.images, self.chars, self.tokens, self.sequence = [], [], [], []
    self.sides = []

  def add(self, doc, tokenizer, patches_per_image):
    self.documents += 1
    texts = [s for s in doc.segments if isinstance(s, str)]
    imgs = [s for s in doc.segments if isinstance(s, ImageSegment)]
    self.images.append(len(imgs))
    self.sides += [max(s.height, s.width) for s in imgs]
    self.chars.append(sum(len(t) for t in texts))
    if tokenizer is not None:
      text_tokens = sum(len(tokenizer.encode(t)) for t in texts)
      self.tokens.append(text_tokens)
      # <bos> <eos>, and <image_start> patches <image_end> per image.
      self.sequence.append(2 + text_tokens + len(imgs) * (patches_per_image + 2))


def _describe(values) -> str:
  if not values:
    return "-"
  v = np.asarray(values)
  return (f"mean {v.mean():.1f}  p50 {np.percentile(v, 50):.0f}  p95 {np.percentile(v, 95):.0f}"
          f"  max {v.max()}")


def report(stats: dict, tokenizer_path: str, patches_per_image: int) -> str:
  lines = []
  for source, s in sorted(stats.items()):
    lines += [f"source {source}: {s.documents} documents, {s.bad} unreadable records, "
              f"{sum(s.images)} images",
              f"  images/doc   {_describe(s.images)}",
              f"  image side   {_describe(s.sides)}",
              f"  text chars   {_describe(s.chars)}"]
    if tokenizer_path:
      lines += [f"  text tokens  {_describe(s.tokens)}",
                f"  seq length   {_describe(s.sequence)}  (images at {patches_per_image} tokens)"]
  if tokenizer_path:
    lines.append(f"tokenizer: {tokenizer_path}")
  else:
    lines.append("no tokenizer found: pass --tokenizer for token statistics")
  return "\n".join(lines)


def collect(shards, tokenizer, patches_per_image, max_per_shard, keep: int):
  """(stats by source, `keep` documents taken in turn from each source's first ones)."""
  stats = collections.defaultdict(SourceStats)
  first = collections.defaultdict(list)
  for where, doc in iter_documents(shards, max_per_shard):
    if isinstance(doc, str):
      stats[where.split("/")[-2] if "/" in where else "?"].bad += 1
      continue
    stats[doc.source].add(doc, tokenizer, patches_per_image)
    if len(first[doc.source]) < keep:
      first[doc.source].append((where, doc))
  in_turn = [d for group in itertools.zip_longest(*first.values()) for d in group if d]
  return stats, in_turn[:keep]


def contact_sheet(documents, path: str, thumb: int = 96, width: int = 520):
  """A PNG with one row per document: its images as thumbnails, then its text, wrapped."""
  font = ImageFont.load_default()
  rows = []
  for where, doc in documents:
    imgs = [s for s in doc.segments if isinstance(s, ImageSegment)]
    text = _text_with_image_marks(doc.segments)
    lines = [f"{doc.source} | {where}"] + textwrap.wrap(text, 80)[:8]
    height = (thumb + 8 if imgs else 0) + 14 * len(lines) + 12
    row = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(row)
    for i, segment in enumerate(imgs[:width // (thumb + 4)]):
      img = images.decode(segment.encoded)
      scale = thumb / max(img.size)  # small images are enlarged too, without smoothing
      img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                       Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BICUBIC)
      row.paste(img, (4 + i * (thumb + 4), 4))
    y = (thumb + 8) if imgs else 4
    for line in lines:
      draw.text((4, y), line, fill="black", font=font)
      y += 14
    rows.append(row)
  sheet = Image.new("RGB", (width, sum(r.height for r in rows) + 2 * len(rows)), (128, 128, 128))
  y = 0
  for row in rows:
    sheet.paste(row, (0, y))
    y += row.height + 2
  sheet.save(path)


def _text_with_image_marks(segments) -> str:
  """The document's text with "[image N]" where its N-th image stands."""
  parts, n = [], 0
  for s in segments:
    if isinstance(s, ImageSegment):
      n += 1
      parts.append(f"[image {n}]")
    else:
      parts.append(s)
  return " ".join(parts)


def main(argv):
  shards = expand_shards(argv[1:] or ["."], FLAGS.split)
  tokenizer_path = FLAGS.tokenizer or find_tokenizer(shards)
  tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
  keep = FLAGS.num_documents if FLAGS.contact_sheet else 0
  stats, first = collect(shards, tokenizer, FLAGS.patches_per_image, FLAGS.max_per_shard, keep)
  print(f"{len(shards)} shards")
  print(report(stats, tokenizer_path, FLAGS.patches_per_image))
  if FLAGS.contact_sheet:
    contact_sheet(first, FLAGS.contact_sheet)
    print(f"contact sheet: {FLAGS.contact_sheet} ({len(first)} documents)")
