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


def write_ilsvrc_tars(manual_dir: str, *, per_synset: int = 6, num_val: int = 8,
                      garbage: tuple[str, int] | None = None) -> None:
  """ILSVRC2012_img_train.tar (one inner tar per synset) and ILSVRC2012_img_val.tar
  (ILSVRC2012_val_%08d.JPEG, labelled by TFDS's bundled list). `garbage` = (synset, index)
  replaces that training image by bytes that are no image at all."""
  rng = np.random.default_rng(0)
  os.makedirs(manual_dir, exist_ok=True)
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as train:
    for synset in SYNSETS:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as tar:
        for i in range(per_synset):
          data = b"not an image: a corrupt download" if garbage == (synset, i) else _jpeg(rng)
          _add(tar, f"{synset}_{i}.JPEG", data)
      _add(train, f"{synset}.tar", inner.getvalue())
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as val:
    for i in range(1, num_val + 1):
      _add(val, f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg(rng))
