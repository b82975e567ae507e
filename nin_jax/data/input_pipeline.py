"""Input pipelines: per-host batches that are a pure function of (seed, step).

Because every train batch depends only on the seed and the step, a resumed run
sees exactly the batches an uninterrupted run would have seen, without saving any
iterator state. Each host builds only its own slice of every global batch; the
trainer assembles global arrays with `jax.make_array_from_process_local_data`.

Small data sets live in memory (see `datasets.py`); ImageNet streams from TFDS
through tf.data on the CPU (`imagenet.py`). `make_data` assembles either for a config.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from nin_jax.data import datasets
from nin_jax.data.batches import Batch, Data, host_slice
from nin_jax.errors import ConfigError

# ----------------------------------------------------------------------------- preprocessing


def global_contrast_normalize(x: np.ndarray, scale: float = 55.0, eps: float = 1e-8) -> np.ndarray:
  """Per-image GCN as in the maxout/NIN CIFAR preprocessing: zero mean, fixed norm."""
  flat = x.reshape(len(x), -1).astype(np.float64)
  flat -= flat.mean(axis=1, keepdims=True)
  norms = np.sqrt((flat**2).sum(axis=1, keepdims=True)) / scale
  return (flat / np.maximum(norms, eps)).reshape(x.shape).astype(np.float32)


def fit_zca(x: np.ndarray, eps: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
  """Mean and whitening matrix of ZCA, fitted on the training images."""
  flat = x.reshape(len(x), -1).astype(np.float64)
  mean = flat.mean(axis=0)
  cov = np.cov(flat - mean, rowvar=False)
  eigval, eigvec = np.linalg.eigh(cov)
  whiten = (eigvec / np.sqrt(eigval + eps)) @ eigvec.T
  return mean.astype(np.float32), whiten.astype(np.float32)


def local_contrast_normalize(x: np.ndarray, radius: int = 4, sigma: float = 2.0, eps: float = 1e-4) -> np.ndarray:
  """Local contrast normalisation (as used for SVHN): subtract a Gaussian-weighted local
  mean and divide by the local standard deviation, per image, channels pooled."""

  def gaussian_matrix(n):  # "same"-mode 1-D Gaussian filter as an (n, n) matrix.
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    taps = np.where(np.abs(offsets) <= radius, np.exp(-0.5 * (offsets / sigma) ** 2), 0.0)
    return (taps / taps.sum(axis=1, keepdims=True)).astype(np.float32)  # Edge-normalised.

  gh, gw = gaussian_matrix(x.shape[1]), gaussian_matrix(x.shape[2])
  blur = lambda a: np.einsum("hi,nij,wj->nhw", gh, a, gw, optimize=True)

  x = x.astype(np.float32) / 255.0
  gray_mean = blur(x.mean(axis=-1))
  centred = x - gray_mean[..., None]
  local_std = np.sqrt(blur((centred**2).mean(axis=-1)))
  divisor = np.maximum(local_std, local_std.mean(axis=(1, 2), keepdims=True))
  return (centred / np.maximum(divisor, eps)[..., None]).astype(np.float32)


PREPROCESSES = ("standardize", "gcn_zca", "lcn", "none")


def preprocess(train: np.ndarray, evaluation: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
  """Turns uint8 splits into float32 model inputs; statistics come from `train` only."""
  if method == "standardize":
    mean = train.mean(axis=(0, 1, 2), dtype=np.float64) / 255.0
    std = train.std(axis=(0, 1, 2), dtype=np.float64) / 255.0
    scale = lambda x: ((x.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
    return scale(train), scale(evaluation)
  if method == "gcn_zca":
    train_g, eval_g = global_contrast_normalize(train), global_contrast_normalize(evaluation)
    mean, whiten = fit_zca(train_g)
    apply = lambda x: ((x.reshape(len(x), -1) - mean) @ whiten).reshape(x.shape).astype(np.float32)
    return apply(train_g), apply(eval_g)
  if method == "lcn":
    return local_contrast_normalize(train), local_contrast_normalize(evaluation)
  if method == "none":
    return train.astype(np.float32) / 255.0, evaluation.astype(np.float32) / 255.0
  raise ValueError(f"Unknown preprocessing {method!r}; choose one of: {', '.join(PREPROCESSES)}.")


# ----------------------------------------------------------------------------- augmentation

AUGMENTS = ("none", "flip", "crop", "crop_flip")


def augment(
  images: np.ndarray,
  method: str,
  rng: np.random.Generator,
  *,
  pad: int = 4,
  global_batch: int | None = None,
  rows: slice = slice(None),
) -> np.ndarray:
  """Zero-pad + random crop and/or horizontal flip, vectorised over the batch.

  The random draws are made for the whole global batch and sliced to `rows` (this
  host's share of it), so the augmentation does not depend on the number of hosts.
  """
  if method not in AUGMENTS:
    raise ValueError(f"Unknown augmentation {method!r}; choose one of: {', '.join(AUGMENTS)}.")
  n, h, w, _ = images.shape
  total = global_batch or n
  offsets = rng.integers(0, 2 * pad + 1, size=(2, total))[:, rows]
  flips = (rng.random(total) < 0.5)[rows]
  if "crop" in method:
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows_h = offsets[0][:, None] + np.arange(h)[None]
    cols_w = offsets[1][:, None] + np.arange(w)[None]
    images = padded[np.arange(n)[:, None, None], rows_h[:, :, None], cols_w[:, None, :]]
  if "flip" in method:
    images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
  return images


# ----------------------------------------------------------------------------- in-memory data


class InMemoryTrain:
  """Shuffled, augmented train batches of an in-memory split, a function of the step.

  Epoch e visits the examples in the permutation drawn from (seed, e); the last
  incomplete batch of an epoch is dropped, as is usual for training.
  """

  def __init__(
    self,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    global_batch: int,
    seed: int,
    augment_method: str,
    process_index: int = 0,
    process_count: int = 1,
  ):
    if global_batch > len(images):
      raise ValueError(f"batch_size {global_batch} exceeds the {len(images)} training examples.")
    self.images, self.labels = images, labels
    self.global_batch, self.seed, self.augment_method = global_batch, seed, augment_method
    self.rows = host_slice(global_batch, process_index, process_count)
    self.steps_per_epoch = len(images) // global_batch
    self._epoch, self._perm = -1, None

  def batch(self, step: int) -> Batch:
    epoch, within = divmod(step, self.steps_per_epoch)
    if epoch != self._epoch:
      self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.images))
    index = self._perm[within * self.global_batch : (within + 1) * self.global_batch][self.rows]
    rng = np.random.default_rng([self.seed, epoch, within])
    images = augment(self.images[index], self.augment_method, rng, global_batch=self.global_batch, rows=self.rows)
    return Batch(images, self.labels[index], np.ones(len(index), np.float32))


def eval_batches(
  images: np.ndarray, labels: np.ndarray, *, global_batch: int, process_index: int = 0, process_count: int = 1
) -> Iterator[Batch]:
  """Every example exactly once; the last global batch is zero-padded and masked."""
  rows = host_slice(global_batch, process_index, process_count)
  for start in range(0, len(images), global_batch):
    stop = min(start + global_batch, len(images))
    x, y = images[start:stop], labels[start:stop]
    mask = np.ones(global_batch, np.float32)
    if stop - start < global_batch:
      missing = global_batch - (stop - start)
      x = np.concatenate([x, np.zeros((missing, *x.shape[1:]), x.dtype)])
      y = np.concatenate([y, np.zeros(missing, y.dtype)])
      mask[stop - start :] = 0
    yield Batch(x[rows], y[rows], mask[rows])


class SyntheticTrain:
  """Random images and labels of any model's shape, for benchmarks and smoke tests."""

  def __init__(
    self,
    *,
    image_shape: tuple[int, int, int],
    num_classes: int,
    global_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
  ):
    self.image_shape, self.num_classes, self.seed = image_shape, num_classes, seed
    self.rows = host_slice(global_batch, process_index, process_count)
    self.steps_per_epoch = 1000

  def batch(self, step: int) -> Batch:
    rng = np.random.default_rng([self.seed, step, self.rows.start])
    n = self.rows.stop - self.rows.start
    images = rng.standard_normal((n, *self.image_shape), np.float32)
    return Batch(images, rng.integers(0, self.num_classes, n).astype(np.int32), np.ones(n, np.float32))


def synthetic_eval(*, image_shape, num_classes: int, num_examples: int, seed: int):
  rng = np.random.default_rng([seed, 10**6])
  return (
    rng.standard_normal((num_examples, *image_shape), np.float32),
    rng.integers(0, num_classes, num_examples).astype(np.int32),
  )


# ----------------------------------------------------------------------------- a config's data


def _array_data(
  config, train, eval_x: np.ndarray, eval_y: np.ndarray, num_train: int, process_index: int, process_count: int
) -> Data:
  """Data from a train source with `.batch(step)` and an in-memory eval split."""
  return Data(
    train_batches=lambda start: (train.batch(s) for s in range(start, 2**62)),
    eval_batches=lambda: eval_batches(
      eval_x, eval_y, global_batch=config.eval_batch_size, process_index=process_index, process_count=process_count
    ),
    num_train_examples=num_train,
    num_eval_examples=len(eval_x),
  )


def in_memory_arrays(config, *, test_set: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(train images, train labels, eval images, eval labels) of the config's in-memory data set,
  cut to `train_examples` / `eval_examples` and preprocessed with the training images' statistics.

  With `validation_examples` the last N training images are the eval split (a validation set
  for choosing settings without looking at the test set) and the rest the training one;
  `test_set` keeps that training split but returns the test set as the eval one (a run's
  final test error, measured once).
  """
  arrays = datasets.load_arrays(
    config.dataset, data_dir=config.data_dir or None, download=config.download, idx_dir=config.idx_dir or None
  )
  train_x, train_y = arrays.train_images, arrays.train_labels
  eval_x, eval_y = arrays.eval_images, arrays.eval_labels
  held_out = config.get("validation_examples", 0)
  if held_out > 0:
    if held_out >= len(train_x):
      raise ConfigError(
        f"validation_examples {held_out:,} leaves none of the {len(train_x):,} training "
        f"images of {config.dataset} to train on; lower --config.validation_examples."
      )
    train_x, train_y = train_x[:-held_out], train_y[:-held_out]
    if not test_set:
      eval_x, eval_y = arrays.train_images[-held_out:], arrays.train_labels[-held_out:]
  if config.train_examples > 0:
    train_x, train_y = train_x[: config.train_examples], train_y[: config.train_examples]
  if config.eval_examples > 0:
    eval_x, eval_y = eval_x[: config.eval_examples], eval_y[: config.eval_examples]
  train_x, eval_x = preprocess(train_x, eval_x, config.preprocess)
  return train_x, train_y, eval_x, eval_y


def _in_memory_data(config, process_index: int, process_count: int) -> Data:
  train_x, train_y, eval_x, eval_y = in_memory_arrays(config)
  if config.batch_size > len(train_x):
    raise ConfigError(
      f"batch_size {config.batch_size} exceeds the {len(train_x):,} training examples of "
      f"{config.dataset}; lower --config.batch_size"
      + (" or raise --config.train_examples." if config.train_examples > 0 else ".")
    )
  train = InMemoryTrain(
    train_x,
    train_y,
    global_batch=config.batch_size,
    seed=config.seed,
    augment_method=config.augment,
    process_index=process_index,
    process_count=process_count,
  )
  return _array_data(config, train, eval_x, eval_y, len(train_x), process_index, process_count)


def _synthetic_data(
  config, image_shape: tuple[int, int, int], num_classes: int, process_index: int, process_count: int
) -> Data:
  train = SyntheticTrain(
    image_shape=image_shape,
    num_classes=num_classes,
    global_batch=config.batch_size,
    seed=config.seed,
    process_index=process_index,
    process_count=process_count,
  )
  eval_x, eval_y = synthetic_eval(
    image_shape=image_shape, num_classes=num_classes, num_examples=config.eval_examples or 1000, seed=config.seed
  )
  num_train = config.train_examples or config.batch_size * train.steps_per_epoch
  return _array_data(config, train, eval_x, eval_y, num_train, process_index, process_count)


def make_data(
  config, *, image_size: int, in_channels: int, num_classes: int, process_index: int, process_count: int
) -> Data:
  """This host's share of the config's data set, at the model's input size."""
  if config.dataset == "synthetic":
    return _synthetic_data(config, (image_size, image_size, in_channels), num_classes, process_index, process_count)
  if datasets.get_info(config.dataset).in_memory:
    return _in_memory_data(config, process_index, process_count)
  from nin_jax.data import imagenet  # tf.data streaming; imported only when used.

  return imagenet.make_data(config, image_size, process_index, process_count)
