"""Batches as pure functions of (seed, step), host shares, padding, preprocessing."""

import numpy as np
import pytest

from nin_jax import errors
from nin_jax.data import datasets, input_pipeline


def arrays(n=100, size=8, channels=3):
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8).astype(np.float32), np.arange(
    n, dtype=np.int32
  )


def test_train_batches_depend_only_on_seed_and_step():
  x, y = arrays()
  a = input_pipeline.InMemoryTrain(x, y, global_batch=16, seed=3, augment_method="crop_flip")
  b = input_pipeline.InMemoryTrain(x, y, global_batch=16, seed=3, augment_method="crop_flip")
  for step in (7, 0, 12, 7):  # Any order, as after a resume.
    np.testing.assert_array_equal(a.batch(step).images, b.batch(step).images)
    np.testing.assert_array_equal(a.batch(step).labels, b.batch(step).labels)
  assert not np.array_equal(a.batch(0).labels, a.batch(1).labels)


def test_an_epoch_visits_each_example_at_most_once():
  x, y = arrays()
  train = input_pipeline.InMemoryTrain(x, y, global_batch=16, seed=0, augment_method="none")
  seen = np.concatenate([train.batch(s).labels for s in range(train.steps_per_epoch)])
  assert len(seen) == 96 and len(set(seen)) == 96  # 100 // 16 = 6 full batches.


def test_host_shares_make_up_the_global_batch():
  x, y = arrays()
  whole = input_pipeline.InMemoryTrain(x, y, global_batch=16, seed=1, augment_method="crop_flip")
  shares = [
    input_pipeline.InMemoryTrain(
      x, y, global_batch=16, seed=1, augment_method="crop_flip", process_index=i, process_count=4
    )
    for i in range(4)
  ]
  np.testing.assert_array_equal(np.concatenate([s.batch(5).labels for s in shares]), whole.batch(5).labels)
  # Augmented images too: the random crops and flips do not depend on the host count...
  np.testing.assert_array_equal(np.concatenate([s.batch(5).images for s in shares]), whole.batch(5).images)
  # ...and they are augmented: the same examples without augmentation differ.
  plain = input_pipeline.InMemoryTrain(x, y, global_batch=16, seed=1, augment_method="none").batch(5)
  np.testing.assert_array_equal(plain.labels, whole.batch(5).labels)
  assert not np.array_equal(plain.images, whole.batch(5).images)


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_batches_count_every_example_once(process_count):
  x, y = arrays(n=37)
  labels, total_rows = [], 0
  for p in range(process_count):
    for batch in input_pipeline.eval_batches(x, y, global_batch=8, process_index=p, process_count=process_count):
      assert len(batch.labels) == 8 // process_count
      labels += list(batch.labels[batch.mask == 1])
      total_rows += len(batch.labels)
  assert sorted(labels) == list(range(37))
  assert total_rows == 40  # 5 batches of 8; the last has 5 real rows and 3 masked.


def test_crop_and_flip():
  x = np.arange(32 * 4 * 4, dtype=np.float32).reshape(32, 4, 4, 1) + 1
  flipped = input_pipeline.augment(x, "flip", np.random.default_rng(0))
  was_flipped = [np.array_equal(a, b[:, ::-1]) for a, b in zip(flipped, x)]
  assert all(f or np.array_equal(a, b) for f, a, b in zip(was_flipped, flipped, x))
  assert 8 <= sum(was_flipped) <= 24  # About half, and neither none nor all.
  cropped = input_pipeline.augment(x, "crop", np.random.default_rng(1), pad=1)
  assert cropped.shape == x.shape
  offsets = []
  for a, b in zip(cropped, x):  # Each crop is a shifted copy, zero-filled at the edge.
    padded = np.pad(b, ((1, 1), (1, 1), (0, 0)))
    offsets += [(i, j) for i in range(3) for j in range(3) if np.array_equal(a, padded[i : i + 4, j : j + 4])]
  assert len(offsets) == 32 and len(set(offsets)) >= 5  # Many different shifts, not just (1, 1).
  with pytest.raises(ValueError, match="choose one of"):
    input_pipeline.augment(x, "mixup", np.random.default_rng(0))


def test_zca_whitens_the_training_set():
  rng = np.random.default_rng(0)
  mixing = rng.normal(size=(12, 12))
  train = (rng.normal(size=(4000, 12)) @ mixing).reshape(4000, 2, 2, 3)
  mean, whiten = input_pipeline.fit_zca(train, eps=0.0)
  white = (train.reshape(4000, -1) - mean) @ whiten
  np.testing.assert_allclose(np.cov(white, rowvar=False), np.eye(12), atol=1e-3)
  np.testing.assert_allclose(whiten, whiten.T, atol=1e-5)  # ZCA, not PCA: symmetric.


def test_global_contrast_normalisation():
  x = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3)).astype(np.uint8)
  g = input_pipeline.global_contrast_normalize(x, scale=55.0).reshape(5, -1)
  np.testing.assert_allclose(g.mean(axis=1), 0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(g, axis=1), 55.0, rtol=1e-5)


def test_local_contrast_normalisation_removes_local_brightness():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 128, (1, 32, 32, 3))
  brighter = np.clip(image + 100, 0, 255)
  a = input_pipeline.local_contrast_normalize(image.astype(np.uint8))
  b = input_pipeline.local_contrast_normalize(brighter.astype(np.uint8))
  assert a.shape == (1, 32, 32, 3)
  np.testing.assert_allclose(a, b, atol=1e-4)  # A constant offset is normalised away.


def test_standardize_uses_train_statistics():
  train, evaluation = arrays()[0].astype(np.uint8), np.full((3, 8, 8, 3), 128, np.uint8)
  t, e = input_pipeline.preprocess(train, evaluation, "standardize")
  np.testing.assert_allclose(t.mean(axis=(0, 1, 2)), 0, atol=1e-4)
  np.testing.assert_allclose(t.std(axis=(0, 1, 2)), 1, atol=1e-4)
  assert e.shape == evaluation.shape


def test_idx_reader_rejects_truncated_files(tmp_path):
  path = tmp_path / "x-idx3-ubyte"
  header = bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (2).to_bytes(4, "big") + (2).to_bytes(4, "big")
  path.write_bytes(header + bytes(40))
  assert datasets.read_idx(str(path)).shape == (10, 2, 2)
  path.write_bytes(header + bytes(39))
  with pytest.raises(datasets.DataError, match="truncated"):
    datasets.read_idx(str(path))


@pytest.mark.skipif(not datasets.os.path.isdir(datasets.DEBIAN_FASHION_MNIST), reason="needs dataset-fashion-mnist")
def test_fashion_mnist_is_the_real_data_set():
  a = datasets.load_arrays("fashion_mnist")
  assert a.train_images.shape == (60000, 28, 28, 1) and a.eval_images.shape == (10000, 28, 28, 1)
  assert np.bincount(a.train_labels).tolist() == [6000] * 10
  assert np.bincount(a.eval_labels).tolist() == [1000] * 10


def test_missing_data_set_says_how_to_get_it(tmp_path):
  with pytest.raises(errors.DataError, match="tfds build mnist"):
    datasets.load_arrays("mnist", data_dir=str(tmp_path / "empty"), download=False)
  with pytest.raises(errors.DataError, match="apt-get install dataset-fashion-mnist"):
    datasets.load_arrays("fashion_mnist", data_dir=str(tmp_path / "empty"), download=False)


@pytest.mark.skipif(not datasets.os.path.isdir(datasets.DEBIAN_FASHION_MNIST), reason="needs dataset-fashion-mnist")
def test_a_validation_split_is_held_out_of_the_training_set():
  """validation_examples: the last N training images become the eval split, the test set is
  not touched, and train_examples then counts from the rest."""
  from tests.helpers import small_config  # pylint: disable=g-import-not-at-top

  raw = datasets.load_arrays("fashion_mnist")
  config = small_config(train_examples=0, eval_examples=0, validation_examples=10_000, preprocess="none")
  train_x, train_y, eval_x, eval_y = input_pipeline.in_memory_arrays(config)
  assert len(train_x) == 50_000 and len(eval_x) == 10_000
  np.testing.assert_array_equal(eval_y, raw.train_labels[50_000:])
  np.testing.assert_allclose(eval_x, raw.train_images[50_000:] / 255.0, rtol=1e-6)  # "none": scaled to [0, 1].
  np.testing.assert_array_equal(train_y, raw.train_labels[:50_000])
  _, test_train_y, test_x, test_y = input_pipeline.in_memory_arrays(config, test_set=True)
  np.testing.assert_array_equal(test_train_y, raw.train_labels[:50_000])  # Same training split...
  np.testing.assert_array_equal(test_y, raw.eval_labels)  # ...and the test set, not the held-out images.
  np.testing.assert_allclose(test_x, raw.eval_images / 255.0, rtol=1e-6)
  config.update(dict(train_examples=512, eval_examples=300))
  train_x, _, eval_x, eval_y = input_pipeline.in_memory_arrays(config)
  assert len(train_x) == 512 and len(eval_x) == 300
  np.testing.assert_array_equal(eval_y, raw.train_labels[50_000:50_300])
  with pytest.raises(errors.ConfigError, match="leaves none of the 60,000 training images"):
    input_pipeline.in_memory_arrays(small_config(validation_examples=60_000))
