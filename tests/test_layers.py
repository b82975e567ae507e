"""Caffe pooling and the mlpconv block, checked against independent references."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nin_jax.model import layers


def caffe_pool_reference(x: np.ndarray, kind: str, k: int, s: int, p: int) -> np.ndarray:
  """Caffe's pooling loop, written plainly: ceil-rounded output size, windows clipped
  to the image, and an average over the in-image positions only."""
  n, h, w, c = x.shape

  def out_size(size):
    out = int(math.ceil((size + 2 * p - k) / s)) + 1
    if p and (out - 1) * s >= size + p:
      out -= 1
    return out

  oh, ow = out_size(h), out_size(w)
  y = np.zeros((n, oh, ow, c), x.dtype)
  for i, j in itertools.product(range(oh), range(ow)):
    h0, w0 = max(i * s - p, 0), max(j * s - p, 0)
    h1, w1 = min(i * s - p + k, h), min(j * s - p + k, w)
    window = x[:, h0:h1, w0:w1, :]
    y[:, i, j, :] = window.max(axis=(1, 2)) if kind == "max" else window.mean(axis=(1, 2))
  return y


@pytest.mark.parametrize(
  "size,expected", [(54, 27), (55, 27), (27, 13), (13, 6), (32, 16), (16, 8), (28, 14), (14, 7), (7, 3), (3, 1)]
)
def test_pool_output_size_rounds_up_like_caffe(size, expected):
  assert layers.caffe_pool_output_size(size, 3, 2) == expected
  # Floor rounding would lose a row wherever (size - 3) is odd.
  assert (size - 3) // 2 + 1 == expected - ((size - 3) % 2)


def test_pool_output_size_drops_a_window_that_starts_in_the_padding():
  # ceil((4 + 4 - 3) / 3) + 1 = 3, but the third window would start at row 6 - 2 = 4,
  # which is past the image (rows 0..3): Caffe drops it.
  assert layers.caffe_pool_output_size(4, 3, 3, padding=2) == 2


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize(
  "size,k,s,p",
  [(54, 3, 2, 0), (13, 3, 2, 0), (8, 3, 2, 0), (7, 3, 2, 0), (9, 2, 2, 0), (10, 3, 2, 1), (6, 6, 1, 0), (5, 3, 3, 1)],
)
def test_pool2d_matches_caffe_reference(kind, size, k, s, p):
  x = np.random.default_rng(size * 10 + k).normal(size=(2, size, size, 3)).astype(np.float32)
  got = np.asarray(layers.pool2d(jnp.asarray(x), kind, k, s, p))
  np.testing.assert_allclose(got, caffe_pool_reference(x, kind, k, s, p), rtol=1e-6, atol=1e-6)


def test_average_pool_does_not_count_the_border():
  x = jnp.ones((1, 8, 8, 1))
  # Every window of a constant map averages to the constant, including the clipped
  # last row and column (8 -> 4 with ceil rounding: the last window covers 2 rows).
  np.testing.assert_array_equal(np.asarray(layers.pool2d(x, "avg", 3, 2)), np.ones((1, 4, 4, 1)))


def test_max_pool_gradient_matches_reduce_window():
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 4))

  def ours(x):
    return jnp.sum(layers.pool2d(x, "max", 3, 2) ** 2)

  def xla(x):
    y = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")
    return jnp.sum(y**2)

  np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(xla)(x), rtol=1e-6)


def test_pool2d_rejects_unknown_kind():
  with pytest.raises(ValueError, match="'max' or 'avg'"):
    layers.pool2d(jnp.ones((1, 4, 4, 1)), "min", 3, 2)


def test_mlpconv_equals_1x1_convolutions_on_the_same_weights():
  block = layers.MLPConv(3, (8, 6, 5), kernel_size=3, stride=2, padding=1, rngs=nnx.Rngs(0))
  for layer in block.mlp:  # Non-zero biases, so the bias path is checked too.
    layer.bias[...] = jax.random.normal(jax.random.key(1), layer.bias.shape)
  x = jax.random.normal(jax.random.key(2), (2, 11, 11, 3))

  y = nnx.relu(
    jax.lax.conv_general_dilated(
      x, block.conv.kernel[...], (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    + block.conv.bias[...]
  )
  for layer in block.mlp:
    kernel_1x1 = layer.kernel[...][None, None]  # (1, 1, in, out): a 1x1 convolution.
    y = nnx.relu(
      jax.lax.conv_general_dilated(y, kernel_1x1, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      + layer.bias[...]
    )

  out = block(x)
  assert out.shape == (2, 6, 6, 5)
  np.testing.assert_allclose(np.asarray(out), np.asarray(y), rtol=1e-5, atol=1e-5)
