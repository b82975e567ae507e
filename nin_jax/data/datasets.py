"""What each supported data set is, and loading the small ones into memory.

The small data sets (MNIST, Fashion-MNIST, CIFAR, SVHN: at most 250 MB as uint8)
are held whole in host memory and batched with NumPy: on a 2-core machine a
streaming pipeline competes with the training step for the cores, while indexing
an in-memory array costs nothing. ImageNet streams through tf.data (`imagenet.py`).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import socket
import urllib.parse
import zlib

import numpy as np

from nin_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  tfds_name: str
  num_classes: int
  image_size: int
  channels: int
  train_split: str
  eval_split: str
  in_memory: bool = True


DATASETS = {
  "fashion_mnist": DatasetInfo("fashion_mnist", "fashion_mnist", 10, 28, 1, "train", "test"),
  "mnist": DatasetInfo("mnist", "mnist", 10, 28, 1, "train", "test"),
  "cifar10": DatasetInfo("cifar10", "cifar10", 10, 32, 3, "train", "test"),
  "cifar100": DatasetInfo("cifar100", "cifar100", 100, 32, 3, "train", "test"),
  "svhn": DatasetInfo("svhn", "svhn_cropped", 10, 32, 3, "train", "test"),
  "imagenet2012": DatasetInfo("imagenet2012", "imagenet2012", 1000, 224, 3, "train", "validation", in_memory=False),
  "synthetic": DatasetInfo("synthetic", "", 10, 32, 3, "train", "test"),
}

# Names of the classes, in label order, where a data set has them (for plots).
CLASS_NAMES = {
  "fashion_mnist": (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
  ),
  "mnist": tuple(str(i) for i in range(10)),
  "svhn": tuple(str(i) for i in range(10)),
  "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
IDX_DATASETS = ("mnist", "fashion_mnist")  # Distributed as IDX files (--config.idx_dir).


@dataclasses.dataclass
class ArraySplits:
  """uint8 NHWC images and int32 labels of a train and an eval split."""

  train_images: np.ndarray
  train_labels: np.ndarray
  eval_images: np.ndarray
  eval_labels: np.ndarray
  source: str


def get_info(name: str) -> DatasetInfo:
  if name not in DATASETS:
    raise DataError(f"Unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}.")
  return DATASETS[name]


_IDX_FIX = (
  "reinstall the data set (Debian: apt-get install --reinstall dataset-fashion-mnist) or point "
  "--config.idx_dir at a directory holding the four IDX files"
)


def read_idx(path: str) -> np.ndarray:
  """Reads a (gzipped) IDX file, the format of the original MNIST-style distributions.

  Every way such a file can be damaged (missing, empty, not gzip, cut short) is a
  DataError naming the file, never a traceback from gzip or numpy.
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except FileNotFoundError as e:
    raise DataError(f"{path} is missing; {_IDX_FIX}.") from e
  except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
    raise DataError(f"{path} is damaged ({type(e).__name__}: {e}); {_IDX_FIX}.") from e
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise DataError(f"{path} is not an IDX file of unsigned bytes ({len(data)} bytes); {_IDX_FIX}.")
  ndim = data[3]
  shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
  array = np.frombuffer(data, np.uint8, offset=min(4 + 4 * ndim, len(data)))
  if array.size != int(np.prod(shape)):
    raise DataError(f"{path} is truncated ({array.size} of {int(np.prod(shape))} values); {_IDX_FIX}.")
  return array.reshape(shape)


def _idx_file(directory: str, stem: str) -> str:
  """`stem` in `directory`, gzipped or not."""
  plain = os.path.join(directory, stem)
  return plain if os.path.exists(plain) and not os.path.exists(plain + ".gz") else plain + ".gz"


def load_idx_dir(directory: str) -> ArraySplits:
  """The four files of an MNIST-style IDX distribution (train/t10k, images/labels)."""
  if not os.path.isdir(directory):
    raise DataError(
      f"{directory} is not a directory; point --config.idx_dir at the one holding the four "
      "IDX files (train-images-idx3-ubyte[.gz], ...)."
    )

  def load(prefix):
    images = read_idx(_idx_file(directory, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_idx_file(directory, f"{prefix}-labels-idx1-ubyte"))
    if len(images) != len(labels):
      raise DataError(f"{directory} holds {len(images)} {prefix} images but {len(labels)} labels; {_IDX_FIX}.")
    return images[..., None], labels.astype(np.int32)

  train_x, train_y = load("train")
  eval_x, eval_y = load("t10k")
  return ArraySplits(train_x, train_y, eval_x, eval_y, source=directory)


def import_tfds():
  """TFDS, with TensorFlow kept off every GPU (they belong to JAX).

  Imported only when a TFDS data set is used: TensorFlow takes ~2 s to import, and
  the offline default (Debian's Fashion-MNIST files) needs none of it.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TensorFlow already started, with this setting from an earlier call.
    pass
  return tfds


def _unreachable_hosts(urls, timeout: float = 5.0) -> dict[str, str]:
  """The hosts of `urls` that no connection reaches, with the reason."""
  unreachable = {}
  for host in sorted({urllib.parse.urlsplit(url).hostname for url in urls}):
    try:
      socket.create_connection((host, 443), timeout).close()
    except OSError as e:
      unreachable[host] = str(e) or type(e).__name__
  return unreachable


def _check_downloadable(builder) -> None:
  """Fails within seconds where TFDS's downloader would retry for 3.5 minutes: a data set
  that is not prepared and whose download hosts cannot be reached (offline machines)."""
  unreachable = _unreachable_hosts(builder.url_infos or {})
  if unreachable:
    hosts = "; ".join(f"{host}: {reason}" for host, reason in unreachable.items())
    raise DataError(
      f"TFDS {builder.name!r} is not prepared in {builder.data_dir} and cannot be downloaded from "
      f"here ({hosts}); prepare it with `tfds build {builder.name}` on a machine with internet "
      "access and point --config.data_dir at its directory."
    )


def _load_tfds(info: DatasetInfo, data_dir: str | None, download: bool) -> ArraySplits:
  tfds = import_tfds()
  builder = tfds.builder(info.tfds_name, data_dir=data_dir)
  if download and not builder.is_prepared():
    _check_downloadable(builder)

  splits = []
  for split in (info.train_split, info.eval_split):
    try:
      ds = tfds.load(
        info.tfds_name, split=split, data_dir=data_dir, download=download, as_supervised=True, shuffle_files=False
      )
    except Exception as e:  # TFDS raises many types for "not there" (AssertionError, OSError, ...).
      raise DataError(
        f"Could not load TFDS {info.tfds_name!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
        f"prepare it with `tfds build {info.tfds_name}` on a machine with internet access and "
        "point --config.data_dir at its directory."
      ) from e
    # Batches, not batch_size=-1: that builds one batch of the split's recorded size.
    chunks = list(tfds.as_numpy(ds.batch(8192)))
    splits += [
      np.concatenate([c[0] for c in chunks]).astype(np.uint8),
      np.concatenate([c[1] for c in chunks]).astype(np.int32),
    ]
  return ArraySplits(*splits, source=f"tfds:{info.tfds_name}")


def load_arrays(
  name: str, *, data_dir: str | None = None, download: bool = True, idx_dir: str | None = None
) -> ArraySplits:
  """The whole train and eval splits of a small data set, as uint8 NHWC arrays.

  `idx_dir` (MNIST and Fashion-MNIST) reads the original IDX files from a directory.
  Fashion-MNIST otherwise comes from Debian's `dataset-fashion-mnist` files when they
  are installed (offline, 0.2 s), else from TFDS.
  """
  info = get_info(name)
  if not info.in_memory or name == "synthetic":
    raise ValueError(f"{name} is not an in-memory data set.")
  if idx_dir:
    if name not in IDX_DATASETS:
      raise DataError(f"idx_dir applies to {' and '.join(IDX_DATASETS)}, not {name}; leave it empty.")
    return load_idx_dir(idx_dir)
  if name == "fashion_mnist" and os.path.isdir(DEBIAN_FASHION_MNIST) and data_dir is None:
    return load_idx_dir(DEBIAN_FASHION_MNIST)
  try:
    return _load_tfds(info, data_dir, download)
  except DataError as e:
    if name == "fashion_mnist":
      raise DataError(
        "Fashion-MNIST not found: install it with `apt-get install dataset-fashion-mnist` "
        f"(offline) or let TFDS download it (`tfds build fashion_mnist`). [{e}]"
      ) from e
    raise
