"""scikit-learn's bundled handwritten digits (1,797 8x8 greyscale images, no download) as a small
real caption source: dark ink on white, upsampled to the model's resolution, captioned
"a handwritten digit seven"."""
import numpy as np
from PIL import Image

from nmm_jax.data.records import encode_png

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def caption_for(digit: int) -> str:
  return f"a handwritten digit {DIGIT_NAMES[digit]}"


class DigitsImporter:

  def __init__(self, image_size: int = 224):
    if image_size < 8:
      raise ValueError(f"--image_size={image_size}: the digits are 8x8, use at least 8")
    self.image_size = image_size
    self._data = None

  def _digits(self):
    if self._data is None:  # loaded in each worker, on first use
      try:
        from sklearn.datasets import load_digits
      except ImportError as e:
        raise ImportError("--from=sklearn-digits needs scikit-learn: pip install -e .[data]") from e
      self._data = load_digits()
    return self._data

  def items(self):
    return list(range(len(self._digits().target)))

  def convert(self, index):
    data = self._digits()
    # Values 0..16 are ink density: 16 -> black ink on a white page.
    grey_8x8 = (255 - data.images[index] * (255 / 16)).round().astype(np.uint8)
    big = Image.fromarray(grey_8x8, "L").resize((self.image_size, self.image_size),
                                                Image.Resampling.BICUBIC)
    pixels_SxSx3 = np.asarray(big.convert("RGB"), np.uint8)
    digit = int(data.target[index])
    return (encode_png(pixels_SxSx3), caption_for(digit)), {"digit": digit, "index": index}
