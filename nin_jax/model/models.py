"""The NIN model zoo: faithful variants of the paper and the Caffe model zoo.

`create_model` is the one factory everything else uses. `python -m nin_jax.model.models
NAME` prints a layer table like the paper's (shapes and parameters per layer).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from nin_jax.model import layers

HEADS = ("gap", "fc", "fc_dropout")
INITS = ("he", "caffe")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
Head = Literal["gap", "fc", "fc_dropout"]
LAST_LAYER_STD = 0.01  # `he` init: std of the per-class 1x1 layer (Caffe's cccp8 uses 0.01 too).


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One mlpconv block: kxk conv to features[0], then 1x1 layers to features[1:]."""

  kernel_size: int
  features: tuple[int, ...]
  stride: int = 1
  padding: int = 0
  init_stds: tuple[float, ...] = ()  # Caffe's Gaussian std per layer.
  pool: layers.PoolKind | None = None  # 3x3/2 ceil-mode pool after the block.
  dropout: float = 0.0  # Dropout after the block (and its pool).


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  name: str
  blocks: tuple[BlockSpec, ...]
  image_size: int
  in_channels: int
  num_classes: int
  description: str


def _block(kernel, features, stride=1, padding=0, std=0.05, pool=None, dropout=0.0, stds=None):
  stds = tuple(stds) if stds is not None else (std,) * len(features)
  return BlockSpec(kernel, tuple(features), stride, padding, stds, pool, dropout)


def _small_image_model(name, widths, kernels, image_size, in_channels, num_classes, description):
  """The paper's 3-block layout: pool 3x3/2 + dropout 0.5 after blocks 1 and 2, then GAP."""
  blocks = []
  for i, (w, k) in enumerate(zip(widths, kernels)):
    last = i == len(widths) - 1
    blocks.append(
      _block(
        k,
        w if not last else (*w, num_classes),
        padding=k // 2,
        pool=None if last else "max",
        dropout=0.0 if last else 0.5,
      )
    )
  return ModelSpec(name, tuple(blocks), image_size, in_channels, num_classes, description)


def _imagenet() -> ModelSpec:
  blocks = (
    _block(11, (96, 96, 96), stride=4, stds=(0.01, 0.05, 0.05), pool="max"),
    _block(5, (256, 256, 256), padding=2, stds=(0.05, 0.05, 0.05), pool="max"),
    _block(3, (384, 384, 384), padding=1, stds=(0.01, 0.05, 0.05), pool="max", dropout=0.5),
    _block(3, (1024, 1024, 1000), padding=1, stds=(0.05, 0.05, 0.01)),
  )
  return ModelSpec("nin_imagenet", blocks, 224, 3, 1000, "Caffe model zoo, 4 mlpconv blocks")


VARIANTS: dict[str, ModelSpec] = {
  "nin_imagenet": _imagenet(),
  "nin_cifar10": _small_image_model(
    "nin_cifar10", [(192, 160, 96), (192, 192, 192), (192, 192)], (5, 5, 3), 32, 3, 10, "paper, CIFAR-10"
  ),
  "nin_cifar100": _small_image_model(
    "nin_cifar100", [(192, 160, 96), (192, 192, 192), (192, 192)], (5, 5, 3), 32, 3, 100, "paper, CIFAR-100"
  ),
  "nin_svhn": _small_image_model(
    "nin_svhn", [(128, 96, 64), (320, 256, 128), (384, 256)], (5, 5, 5), 32, 3, 10, "paper, SVHN"
  ),
  "nin_mnist": _small_image_model(
    "nin_mnist", [(96, 64, 48), (128, 96, 48), (128, 96)], (5, 5, 5), 28, 1, 10, "paper, MNIST"
  ),
}


def _choice_error(what: str, value, choices) -> ValueError:
  return ValueError(f"Unknown {what} {value!r}; choose one of: {', '.join(choices)}.")


def get_spec(
  name: str,
  *,
  num_classes: int | None = None,
  pool2: layers.PoolKind | None = None,
  in_channels: int | None = None,
  dropout: float | None = None,
) -> ModelSpec:
  """A variant's spec, with the class count, input channels, pool2 kind or dropout changed.

  `pool2="avg"` gives the Caffe CIFAR-10 port, which averages in its second pool.
  `dropout` replaces the rate of the body's dropout layers (the paper's is 0.5).
  """
  if name not in VARIANTS:
    raise _choice_error("model", name, VARIANTS)
  spec = VARIANTS[name]
  blocks = list(spec.blocks)
  if num_classes is not None and num_classes != spec.num_classes:
    if num_classes < 1:
      raise ValueError(f"num_classes must be positive, got {num_classes}.")
    last = blocks[-1]
    blocks[-1] = dataclasses.replace(last, features=(*last.features[:-1], num_classes))
  if pool2 is not None:
    if pool2 not in layers.POOL_KINDS:
      raise _choice_error("pool2 kind", pool2, layers.POOL_KINDS)
    blocks[1] = dataclasses.replace(blocks[1], pool=pool2)
  if dropout is not None:
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
    blocks = [dataclasses.replace(b, dropout=dropout if b.dropout > 0 else 0.0) for b in blocks]
  return dataclasses.replace(
    spec, blocks=tuple(blocks), num_classes=blocks[-1].features[-1], in_channels=in_channels or spec.in_channels
  )


def _map_sizes(spec: ModelSpec, image_size: int):
  """Each block with the side of its layers' maps and of its output (after any pool), for a
  square input, following Caffe's rounding."""
  size = image_size
  for block in spec.blocks:
    conv = layers.conv_output_size(size, block.kernel_size, block.stride, block.padding)
    if conv < 1:
      raise ValueError(
        f"Image size {image_size} is too small for {spec.name}; use at least its native {spec.image_size}."
      )
    size = layers.caffe_pool_output_size(conv, 3, 2) if block.pool else conv
    yield block, conv, size


def feature_map_size(spec: ModelSpec, image_size: int) -> int:
  """Side of the last block's maps for a square input, following Caffe's rounding."""
  *_, (_, _, size) = _map_sizes(spec, image_size)
  return size


def activation_bytes(spec: ModelSpec, image_size: int, batch_size: int, dtype) -> int:
  """Bytes of every layer's and pool's output for one batch: what a train step keeps for its
  backward pass, and so the order of XLA's per-step temporaries (`nin_jax/host_memory.py`)."""
  values = 0
  for block, conv, pooled in _map_sizes(spec, image_size):
    values += conv * conv * sum(block.features) + (pooled * pooled * block.features[-1] if block.pool else 0)
  return values * batch_size * jnp.dtype(resolve_dtype(dtype)).itemsize


def layer_names(spec: ModelSpec) -> list[list[str]]:
  """Caffe's names per block: conv1, cccp1, cccp2, conv2, cccp3, ..."""
  names, cccp = [], 0
  for b, block in enumerate(spec.blocks):
    row = [f"conv{b + 1}"]
    for _ in block.features[1:]:
      cccp += 1
      row.append(f"cccp{cccp}")
    names.append(row)
  return names


def resolve_dtype(dtype) -> jnp.dtype:
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise _choice_error("dtype", dtype, DTYPES)
    return DTYPES[dtype]
  return jnp.dtype(dtype)


# A hook that sees every layer's output: (name, output, module or None).
LayerHook = Callable[[str, jax.Array, nnx.Module | None], None]


class NIN(nnx.Module):
  """mlpconv blocks with pooling and dropout between them, then a GAP, FC or FC+dropout head.

  The body is the same for every head (the last block emits one map per class), so
  a head ablation changes nothing but the head, as in the paper's Table 5.
  """

  def __init__(
    self,
    spec: ModelSpec,
    *,
    head: Head = "gap",
    init: str = "he",
    dtype=jnp.float32,
    image_size: int | None = None,
    rngs: nnx.Rngs,
  ):
    if head not in HEADS:
      raise _choice_error("head", head, HEADS)
    if init not in INITS:
      raise _choice_error("init", init, INITS)
    self.spec = spec
    self.head = head
    self.dtype = resolve_dtype(dtype)
    self.image_size = image_size or spec.image_size
    in_features, blocks = spec.in_channels, []
    for block in spec.blocks:
      if init == "caffe":
        inits = [nnx.initializers.normal(std) for std in block.init_stds]
      else:
        inits = [nnx.initializers.he_normal()] * len(block.features)
        if block is spec.blocks[-1]:
          # The per-class layer starts small so the initial logits are near 0 (loss
          # ln(C)) rather than large; large first gradients are what kill its ReLU.
          inits[-1] = nnx.initializers.normal(LAST_LAYER_STD)
      blocks.append(
        layers.MLPConv(
          in_features,
          block.features,
          kernel_size=block.kernel_size,
          stride=block.stride,
          padding=block.padding,
          kernel_inits=inits,
          dtype=self.dtype,
          rngs=rngs,
        )
      )
      in_features = block.features[-1]
    self.blocks = nnx.List(blocks)
    classifier = None
    if head != "gap":
      side = feature_map_size(spec, self.image_size)
      kernel_init = nnx.initializers.normal(0.01) if init == "caffe" else nnx.initializers.lecun_normal()
      classifier = nnx.Linear(
        side * side * in_features, spec.num_classes, kernel_init=kernel_init, dtype=self.dtype, rngs=rngs
      )
    self.classifier = nnx.data(classifier)

  def __call__(
    self, x: jax.Array, *, train: bool = False, dropout_key: jax.Array | None = None, hook: LayerHook | None = None
  ) -> jax.Array:
    """Float32 logits for an NHWC batch.

    Dropout is active only when `train` is true; it then needs `dropout_key`
    (the trainer passes `fold_in(key, step)`, so no RNG state is carried).
    """
    hook = hook or (lambda name, y, module: None)
    drop_index = 0

    def dropout(y, rate, name):
      nonlocal drop_index
      if rate > 0 and train:
        if dropout_key is None:
          raise ValueError("Training with dropout needs a `dropout_key`.")
        keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, drop_index), 1 - rate, y.shape)
        y = jnp.where(keep, y / (1 - rate), 0).astype(y.dtype)
      drop_index += 1
      if rate > 0:
        hook(name, y, None)
      return y

    x = x.astype(self.dtype)
    names = layer_names(self.spec)
    for b, (block_spec, block) in enumerate(zip(self.spec.blocks, self.blocks)):
      for name, (layer, y) in zip(names[b], block.outputs(x)):
        hook(name, y, layer)
      x = y
      if block_spec.pool:
        x = layers.pool2d(x, block_spec.pool, window=3, stride=2)
        hook(f"pool{b + 1} ({block_spec.pool} 3x3/2)", x, None)
      x = dropout(x, block_spec.dropout, f"drop{b + 1}")
    if self.head == "gap":
      logits = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
      hook("gap (global average)", logits[:, None, None, :], None)
      return logits
    x = x.reshape(x.shape[0], -1)
    x = dropout(x, 0.5 if self.head == "fc_dropout" else 0.0, "drop_fc")
    logits = self.classifier(x).astype(jnp.float32)
    hook("fc", logits[:, None, None, :], self.classifier)
    return logits


def create_model(
  name: str,
  *,
  num_classes: int | None = None,
  head: Head = "gap",
  init: str = "he",
  dtype="float32",
  image_size: int | None = None,
  in_channels: int | None = None,
  pool2: layers.PoolKind | None = None,
  dropout: float | None = None,
  rngs: nnx.Rngs | None = None,
) -> NIN:
  """Builds a named NIN variant (see `VARIANTS`) with the requested head and initialiser."""
  spec = get_spec(name, num_classes=num_classes, pool2=pool2, in_channels=in_channels, dropout=dropout)
  return NIN(
    spec, head=head, init=init, dtype=dtype, image_size=image_size, rngs=rngs if rngs is not None else nnx.Rngs(0)
  )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model a training config asks for, resolved against its data set."""

  spec: ModelSpec
  image_size: int
  config: ml_collections.ConfigDict

  def build(self, rngs: nnx.Rngs) -> NIN:
    c = self.config
    return create_model(
      c.model,
      num_classes=self.spec.num_classes,
      head=c.head,
      init=c.init,
      dtype=c.dtype,
      image_size=self.image_size,
      in_channels=self.spec.in_channels,
      pool2=c.pool2 or None,
      dropout=dropout_of(c),
      rngs=rngs,
    )

  def initial(self) -> NIN:
    """The model as training starts from it, seeded by the config's `seed`: the one place
    the trainer and the ablation's traces both initialise through, so a trace's step 0 is
    the run's own."""
    return self.build(nnx.Rngs(self.config.seed))


def dropout_of(config) -> float | None:
  """A config's `dropout`: negative means the variant's own (the paper's) dropout."""
  return None if config.dropout < 0 else float(config.dropout)


def count_params(module: nnx.Module | None) -> int:
  if module is None:
    return 0
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


@dataclasses.dataclass(frozen=True)
class LayerRow:
  name: str
  shape: tuple[int, int, int]  # H, W, C of one example's output.
  params: int
  mult_adds: int  # Multiply-adds for one example's forward pass.


def _mult_adds(module: nnx.Module | None, out_shape) -> int:
  if isinstance(module, nnx.Conv):
    kh, kw, cin, cout = module.kernel.shape
    return int(np.prod(out_shape[1:3])) * kh * kw * cin * cout
  if isinstance(module, nnx.Linear):
    return int(np.prod(out_shape[1:-1])) * module.kernel.shape[0] * module.kernel.shape[1]
  return 0


def summarize(model: NIN, image_size: int | None = None) -> list[LayerRow]:
  """Per-layer output shapes, parameters and multiply-adds, traced without computing."""
  size = image_size or model.image_size
  rows: list[LayerRow] = []

  def hook(name, y, module):
    rows.append(LayerRow(name, tuple(y.shape[1:]), count_params(module), _mult_adds(module, y.shape)))

  x = jax.ShapeDtypeStruct((1, size, size, model.spec.in_channels), jnp.float32)
  nnx.eval_shape(lambda m, x: m(x, hook=hook), model, x)  # Also for an abstract `model`.
  return rows


def total_mult_adds(model: NIN, image_size: int | None = None) -> int:
  """Multiply-adds of one image's forward pass: the sum of `summarize`'s table (FLOP counts)."""
  return sum(r.mult_adds for r in summarize(model, image_size))


def abstract_model(name: str, **kwargs) -> NIN:
  """`create_model` with shapes instead of numbers: for tables and counts, in milliseconds."""
  return nnx.eval_shape(lambda: create_model(name, **kwargs))


def format_table(rows: list[LayerRow]) -> str:
  lines = [f"{'layer':<24} {'output':>12} {'parameters':>12} {'mult-adds':>14}"]
  for r in rows:
    shape = "x".join(str(d) for d in r.shape)
    lines.append(f"{r.name:<24} {shape:>12} {r.params:>12,} {r.mult_adds:>14,}")
  lines.append(f"total parameters: {sum(r.params for r in rows):,}")
  lines.append(f"total multiply-adds: {sum(r.mult_adds for r in rows):,}")
  return "\n".join(lines)


def models_markdown() -> str:
  """The README's *Models* table, generated from the code so that it cannot drift."""
  lines = ["| model | input | classes | parameters | multiply-adds / image | source |", "|---|---|---|---|---|---|"]
  for name, spec in VARIANTS.items():
    rows = summarize(abstract_model(name))
    params = sum(r.params for r in rows)
    gmacs = sum(r.mult_adds for r in rows) / 1e9
    lines.append(
      f"| `{name}` | {spec.image_size}x{spec.image_size}x{spec.in_channels} | "
      f"{spec.num_classes} | {params:,} | {gmacs:.4f} G | {spec.description} |"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m nin_jax.model.models", description="Print a NIN variant's layer table."
  )
  parser.add_argument("name", nargs="?", help=f"one of: {', '.join(VARIANTS)}")
  parser.add_argument("--image-size", type=int, default=None, help="square input side")
  parser.add_argument("--head", default="gap", help=f"one of: {', '.join(HEADS)}")
  parser.add_argument("--num-classes", type=int, default=None)
  parser.add_argument("--markdown", action="store_true", help="print the README's table of all variants instead")
  args = parser.parse_args(argv)
  if args.markdown:
    print(models_markdown())
    return 0
  if args.name is None:
    parser.error(f"give a model name: {', '.join(VARIANTS)}")
  try:
    model = abstract_model(args.name, head=args.head, num_classes=args.num_classes, image_size=args.image_size)
    print(f"{args.name}, head {args.head}, input {model.image_size}x{model.image_size}x{model.spec.in_channels}")
    print(format_table(summarize(model)))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
