"""Any TFDS image+text dataset prepared in the array_record format, read with
`tfds.data_source` (random access, no TensorFlow needed).

The image and text features are found by type unless named (`image_key`, `text_key`; nested
features as "a/b"). Images are read still encoded (no decode/re-encode). A text feature that is a
sequence (several captions per image) gives its first caption.
"""
from nmm_jax.data.importers import BadItem
from nmm_jax.data.importers.common import clean_text, image_segment


def _tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError("--from=tfds needs tensorflow-datasets: pip install -e .[data]") from e
  return tfds


def _flat_features(features, prefix=""):
  """{"a/b": feature} for every leaf of a FeaturesDict."""
  tfds = _tfds()
  out = {}
  for name, feature in features.items():
    path = f"{prefix}{name}"
    if isinstance(feature, tfds.features.FeaturesDict):
      out.update(_flat_features(feature, path + "/"))
    else:
      out[path] = feature
  return out


def _leaf_type(feature):
  tfds = _tfds()
  while isinstance(feature, tfds.features.Sequence):
    feature = feature.feature
  return feature


class TfdsImporter:

  def __init__(self, name: str, data_dir: str = "", split: str = "train", image_key: str = "",
               text_key: str = "", max_image_side: int = 0):
    self.name, self.data_dir, self.split = name, data_dir or None, split
    self.max_image_side = max_image_side
    tfds = _tfds()
    features = _flat_features(self._open(decoders=None).dataset_info.features)
    self.image_key = image_key or self._find(features, tfds.features.Image, "image")
    self.text_key = text_key or self._find(features, tfds.features.Text, "text")
    for key in (self.image_key, self.text_key):
      if key not in features:
        raise ValueError(f"TFDS {name}: no feature {key!r} (features: {sorted(features)})")
    self._source = None

  def _find(self, features, kind, what):
    found = [k for k, f in features.items() if isinstance(_leaf_type(f), kind)]
    if not found:
      raise ValueError(f"TFDS {self.name}: no {what} feature (features: {sorted(features)})")
    return found[0]

  def _skip_image_decoding(self):
    """{"a": {"b": SkipDecoding()}} for image_key "a/b": images come back as stored bytes."""
    decoders = _tfds().decode.SkipDecoding()
    for part in reversed(self.image_key.split("/")):
      decoders = {part: decoders}
    return decoders

  def _open(self, decoders):
    try:
      return _tfds().data_source(self.name, data_dir=self.data_dir, split=self.split,
                                 download=False, decoders=decoders)
    except Exception as e:
      raise FileNotFoundError(
          f"TFDS dataset {self.name!r} split {self.split!r} is not prepared in the array_record "
          f"format under {self.data_dir or 'the default TFDS data dir'}: {e}") from e

  def _source_for_reading(self):
    if self._source is None:  # opened in each worker process on first use
      self._source = self._open(self._skip_image_decoding())
    return self._source

  def __getstate__(self):
    return {**self.__dict__, "_source": None}

  def items(self):
    return list(range(len(self._source_for_reading())))

  def convert(self, index):
    example = self._source_for_reading()[index]
    where = f"tfds:{self.name}/{self.split}[{index}]"
    image, text = example, example
    for part in self.image_key.split("/"):
      image = image[part]
    for part in self.text_key.split("/"):
      text = text[part]
    return self._segments(image, text, where), {"tfds_index": index}

  def _segments(self, image, text, where):
    if not isinstance(image, bytes):
      raise BadItem("bad_image", f"{where}: image is {type(image).__name__}, expected bytes")
    if not isinstance(text, (bytes, str)):  # a sequence of captions: take the first
      text = text[0] if len(text) else b""
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    return image_segment(image, where, self.max_image_side), clean_text(text, where)
