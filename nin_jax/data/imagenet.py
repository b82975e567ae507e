"""ImageNet through TFDS and tf.data on the CPU, one share of the split per host.

Train batches are reproducible from (seed, step): files and examples are shuffled
with fixed seeds, each example's crop and flip come from stateless ops seeded by
its position in the stream, and a resumed run skips the examples already seen
before decoding them. Images that do not decode (recorded by `imagenet_prepare`'s
verification, or not JPEG files at all) are dropped by name before positions are
counted; one that fails anyway stops the run with a line naming it.
"""

from __future__ import annotations

import math
import re

import numpy as np
import tensorflow as tf

from nin_jax.data import datasets, imagenet_prepare
from nin_jax.data.batches import Batch, Data
from nin_jax.errors import DataError

tfds = datasets.import_tfds()

CAFFE_RESIZE = 256
AUGMENTS = ("none", "inception", "caffe")
UNDECODABLE = "most training images are not JPEG files"
UNDECODABLE_GRACE = 100  # Skipped images allowed beyond half of those seen.
PREPROCESSES = ("caffe_mean", "standardize")
# Caffe's ImageNet mean (RGB) in 0..255, and the per-channel standard deviation.
MEAN_RGB = np.array([123.68, 116.78, 103.94], np.float32)
STD_RGB = np.array([58.40, 57.12, 57.38], np.float32)


def _normalize(image: tf.Tensor, method: str) -> tf.Tensor:
  image = tf.cast(image, tf.float32)
  if method == "caffe_mean":
    return image - MEAN_RGB
  return (image - MEAN_RGB) / STD_RGB


def _decode_resize(encoded: tf.Tensor, size: int) -> tf.Tensor:
  image = tf.io.decode_jpeg(encoded, channels=3)
  return tf.image.resize(image, (size, size), method="bilinear")


def train_example(encoded, seed, *, size: int, augment: str, preprocess: str) -> tf.Tensor:
  """A random crop + mirror of one JPEG; `seed` (2 ints) makes it reproducible."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if augment == "inception":
    shape = tf.io.extract_jpeg_shape(encoded)
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape,
      tf.zeros([0, 0, 4]),
      seed=crop_seed,
      area_range=(0.08, 1.0),
      aspect_ratio_range=(3 / 4, 4 / 3),
      max_attempts=10,
      use_image_if_no_bounding_boxes=True,
    )
    y, x, _ = tf.unstack(begin)
    h, w, _ = tf.unstack(crop_size)
    image = tf.io.decode_and_crop_jpeg(encoded, tf.stack([y, x, h, w]), channels=3)
    image = tf.image.resize(image, (size, size), method="bilinear")
  elif augment == "caffe":  # Caffe: 256x256 image, random size x size crop.
    image = _decode_resize(encoded, CAFFE_RESIZE)
    image = tf.image.stateless_random_crop(image, (size, size, 3), seed=crop_seed)
  else:
    image = _decode_resize(encoded, size)
  if augment != "none":
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
  return _normalize(image, preprocess)


def eval_example(encoded, *, size: int, preprocess: str) -> tf.Tensor:
  """Caffe's single centre crop: resize to 256x256, crop the central size x size."""
  resize = max(CAFFE_RESIZE, size)
  image = _decode_resize(encoded, resize)
  offset = (resize - size) // 2
  return _normalize(image[offset : offset + size, offset : offset + size], preprocess)


def without_undecodable(ds: tf.data.Dataset, recorded: list[str] = ()) -> tf.data.Dataset:
  """(example, images skipped so far): examples whose image is in `recorded` (file names
  that failed to decode when the set was verified) or is not a JPEG file are dropped, and counted.

  A damaged file would otherwise raise inside tf.data at the same step on every resume.
  The drop happens before the trainer's `enumerate().skip()`, so positions count only the
  examples that are trained on and a resumed run repeats the uninterrupted one; the check
  reads a name and the first bytes only, so a resume skipping millions of examples stays cheap.
  """
  keep = _decodable(recorded)

  def count(state, example):
    skipped, seen = state
    kept = keep(example)
    skipped, seen = skipped + tf.cast(tf.logical_not(kept), tf.int64), seen + 1
    # A stream of nothing but corrupt files would otherwise make the filter below spin forever.
    check = tf.debugging.assert_less_equal(skipped, seen // 2 + UNDECODABLE_GRACE, message=UNDECODABLE)
    with tf.control_dependencies([check]):
      return (tf.identity(skipped), seen), (example, kept, skipped)

  ds = ds.scan((tf.constant(0, tf.int64), tf.constant(0, tf.int64)), count)
  return ds.filter(lambda example, kept, skipped: kept).map(lambda example, _, skipped: (example, skipped))


def _decodable(recorded: list[str]):
  """example -> whether to keep it: a JPEG file whose name is not in `recorded`."""
  if not recorded:
    return lambda example: tf.io.is_jpeg(example["image"])
  table = tf.lookup.StaticHashTable(
    tf.lookup.KeyValueTensorInitializer(tf.constant(list(recorded)), tf.ones(len(recorded), tf.int64)), default_value=0
  )
  return lambda example: tf.logical_and(tf.io.is_jpeg(example["image"]), table.lookup(example["file_name"]) == 0)


def _first_failing(examples: tf.data.Dataset, decode) -> tuple[str, str]:
  """(file name, TensorFlow's reason) of the first example that `decode` rejects, tried one
  by one: only the few examples of the batch at which the pipeline failed."""
  for example in examples:
    try:
      decode(example)
    except tf.errors.InvalidArgumentError as e:
      reason = re.sub(r"\{\{[^}]*\}\}|\[Op:\w+\].*", "", e.message.strip().splitlines()[0]).strip()
      return example["file_name"].numpy().decode(), reason[:200]
  return "(not found again: the image may have changed since)", ""


def _failed_to_decode(builder, split: str, name: str, reason: str) -> DataError:
  return DataError(
    f"The {split} image {name} in {builder.data_dir} does not decode ({reason}): the prepared set "
    f"changed since it was verified, or was never verified. Run `{imagenet_prepare.verify_command(builder)}`"
    " to record the images to leave out, then run again (training resumes where it stopped)."
  )


def _left_out(builder, record: dict[str, list[str]] | None) -> tuple[str, ...]:
  if record is None:
    return (
      f"note: the prepared imagenet2012 in {builder.data_dir} was never verified, so a damaged image would "
      f"stop training: verify it once with `{imagenet_prepare.verify_command(builder)}`.",
    )
  return tuple(
    f"{len(names):,} undecodable {split} image(s) left out: {', '.join(names[:5])}"
    + (", ..." if len(names) > 5 else "")
    for split, names in record.items()
    if names
  )


def make_data(config, size: int, process_index: int, process_count: int) -> Data:
  """The trainer's `Data` for ImageNet: this host's shares of train and validation."""
  info = datasets.get_info("imagenet2012")
  builder = imagenet_prepare.prepared_builder(config.data_dir, config.manual_dir, process_count)
  record = imagenet_prepare.undecodable(builder)
  left_out = record or {}
  local_batch = config.batch_size // process_count
  train_split = tfds.even_splits(info.train_split, n=process_count, drop_remainder=True)[process_index]
  eval_splits = tfds.even_splits(info.eval_split, n=process_count)
  num_train = config.train_examples or (
    builder.info.splits[info.train_split].num_examples - len(left_out.get(info.train_split, ()))
  )
  if config.eval_examples > 0:  # At most N/hosts of each host's share (mock data, quick checks).
    eval_counts = [math.ceil(config.eval_examples / process_count)] * process_count
    num_eval = sum(eval_counts)
  else:
    eval_counts = [builder.info.splits[s].num_examples for s in eval_splits]
    num_eval = sum(eval_counts) - len(left_out.get(info.eval_split, ()))
  local_eval_batch = config.eval_batch_size // process_count
  num_eval_batches = max(math.ceil(c / local_eval_batch) for c in eval_counts)
  decoders = {"image": tfds.decode.SkipDecoding()}

  def train_examples(start_step: int) -> tf.data.Dataset:
    """(position, (example, skipped so far)) from `start_step` on, not yet decoded."""
    read = tfds.ReadConfig(shuffle_seed=config.seed, shuffle_reshuffle_each_iteration=True)
    ds = builder.as_dataset(split=train_split, shuffle_files=True, decoders=decoders, read_config=read)
    if config.train_examples > 0:
      ds = ds.take(math.ceil(config.train_examples / process_count))
    ds = ds.repeat().shuffle(config.shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True)
    ds = without_undecodable(ds, left_out.get(info.train_split, ()))
    return ds.enumerate().skip(start_step * local_batch)  # Skip before decoding: cheap.

  def train_one(i, example):
    return train_example(
      example["image"],
      tf.stack([tf.cast(config.seed, tf.int64), i]),
      size=size,
      augment=config.augment,
      preprocess=config.preprocess,
    )

  def train_batches(start_step: int):
    ds = train_examples(start_step).map(
      lambda i, ex_skipped: (train_one(i, ex_skipped[0]), ex_skipped[0]["label"], ex_skipped[1]),
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
    )
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    step = start_step
    try:
      for images, labels, skipped in tfds.as_numpy(ds):
        yield Batch(images, labels.astype(np.int32), np.ones(len(labels), np.float32), skipped=int(skipped.max()))
        step += 1
    except tf.errors.InvalidArgumentError as e:
      if UNDECODABLE in str(e):
        raise DataError(
          f"{UNDECODABLE} in {builder.data_dir}; the prepared data set is damaged: delete that "
          "directory and run again to rebuild it from the ILSVRC tar files."
        ) from e
      # Batches arrive in order, so the image that failed is in the batch of `step` (or the next).
      suspects = train_examples(step).take(2 * local_batch).map(lambda i, ex_skipped: {**ex_skipped[0], "position": i})
      raise _failed_to_decode(
        builder, info.train_split, *_first_failing(suspects, lambda ex: train_one(ex["position"], ex))
      ) from e

  def eval_examples(process: int) -> tf.data.Dataset:
    ds = builder.as_dataset(split=eval_splits[process], decoders=decoders)
    ds = ds.filter(_decodable(left_out.get(info.eval_split, ())))
    return ds.take(eval_counts[process])

  def eval_one(example):
    return eval_example(example["image"], size=size, preprocess=config.preprocess)

  def eval_batches():
    ds = eval_examples(process_index).map(
      lambda ex: (eval_one(ex), tf.cast(ex["label"], tf.int32), tf.constant(1.0)), num_parallel_calls=tf.data.AUTOTUNE
    )
    # Every host yields the same number of batches; padding examples carry mask 0.
    padding = tf.data.Dataset.from_tensors(
      (tf.zeros((size, size, 3)), tf.constant(0, tf.int32), tf.constant(0.0))
    ).repeat()
    ds = ds.concatenate(padding).take(num_eval_batches * local_eval_batch).batch(local_eval_batch)
    batches = 0
    try:
      for images, labels, mask in tfds.as_numpy(ds.prefetch(2)):
        yield Batch(images, labels, mask)
        batches += 1
    except tf.errors.InvalidArgumentError as e:
      suspects = eval_examples(process_index).skip(batches * local_eval_batch).take(2 * local_eval_batch)
      raise _failed_to_decode(builder, info.eval_split, *_first_failing(suspects, eval_one)) from e

  return Data(
    train_batches=train_batches,
    eval_batches=eval_batches,
    num_train_examples=num_train,
    num_eval_examples=num_eval,
    notes=_left_out(builder, record),
  )
