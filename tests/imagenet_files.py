"""ILSVRC-2012 in miniature: the two tar files TFDS prepares `imagenet2012` from, made of real
JPEG files (random pixels), in the layout of the real ones."""

import io
import os
import tarfile

import numpy as np
from PIL import Image

SYNSETS = ("n01440764", "n01443537")  # The first two of TFDS's label list.


def _jpeg(rng: np.random.Generator, width: int = 40, height: int = 30) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="JPEG")
  return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def damaged_body(jpeg: bytes, rng: np.random.Generator, keep: int = 20) -> bytes:
  """`jpeg` with its first `keep` bytes (SOI and the start of the header) kept and the rest
  random, as a truncated download or bit rot leaves it: still a JPEG by its magic bytes."""
  return jpeg[:keep] + rng.integers(0, 256, len(jpeg) - keep, dtype=np.uint8).tobytes()


def write_ilsvrc_tars(
  manual_dir: str,
  *,
  per_synset: int = 6,
  num_val: int = 8,
  garbage: tuple[str, int] | None = None,
  damaged: tuple[str, int] | None = None,
  damaged_val: int | None = None,
) -> None:
  """ILSVRC2012_img_train.tar (one inner tar per synset) and ILSVRC2012_img_val.tar
  (ILSVRC2012_val_%08d.JPEG, labelled by TFDS's bundled list). `garbage` = (synset, index)
  replaces that training image by bytes that are no image at all; `damaged` = (synset, index)
  and `damaged_val` (1-based, as the file names) damage the body of that image."""
  rng = np.random.default_rng(0)
  os.makedirs(manual_dir, exist_ok=True)
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as train:
    for synset in SYNSETS:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as tar:
        for i in range(per_synset):
          data = b"not an image: a corrupt download" if garbage == (synset, i) else _jpeg(rng)
          if damaged == (synset, i):
            data = damaged_body(data, rng)
          _add(tar, f"{synset}_{i}.JPEG", data)
      _add(train, f"{synset}.tar", inner.getvalue())
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as val:
    for i in range(1, num_val + 1):
      data = _jpeg(rng)
      _add(val, f"ILSVRC2012_val_{i:08d}.JPEG", damaged_body(data, rng) if i == damaged_val else data)
