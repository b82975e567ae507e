"""Default config and validation shared by every file in `experiments/`.

Experiment files start from `default_config()` and change what their recipe needs,
so every config has the same keys and a typo in a key is an error, not a silently
ignored setting.
"""

from __future__ import annotations

import math

import ml_collections

from nin_jax.errors import ConfigError


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Data.
  c.dataset = "fashion_mnist"  # datasets.DATASETS
  c.data_dir = ""  # TFDS data_dir ("" = TFDS default).
  c.manual_dir = ""  # ImageNet tar files ("" = <data_dir>/downloads/manual).
  c.download = True  # Let TFDS download small data sets that are not prepared.
  c.idx_dir = ""  # MNIST / Fashion-MNIST as IDX files from this directory ("" = Debian's, else TFDS).
  c.preprocess = "standardize"  # input_pipeline.PREPROCESSES; ImageNet: imagenet.PREPROCESSES
  c.augment = "none"  # input_pipeline.AUGMENTS; ImageNet: imagenet.AUGMENTS
  c.image_size = 0  # 0 = the data set's native size (224 for ImageNet).
  c.train_examples = 0  # > 0: use only the first N training examples.
  c.eval_examples = 0  # > 0: evaluate on the first N examples only (the default is all).
  c.validation_examples = 0  # > 0: hold out the last N training images and evaluate on them, not the test set.
  c.shuffle_buffer = 16_384  # ImageNet (tf.data) only.
  # Model.
  c.model = "nin_mnist"  # models.VARIANTS
  c.head = "gap"  # models.HEADS
  c.init = "he"  # models.INITS
  c.pool2 = ""  # "" = the variant's own, or layers.POOL_KINDS ("avg" = the Caffe CIFAR-10 port).
  c.dropout = -1.0  # < 0: the paper's 0.5 after the pooled blocks; else this rate.
  c.dtype = "float32"  # models.DTYPES (compute; parameters stay float32)
  # Optimisation. Durations are given in epochs or in steps (`durations.steps`); steps win when set.
  c.batch_size = 128  # Global, over all devices of all hosts.
  c.num_epochs = 1.0
  c.num_train_steps = -1  # > 0 wins over num_epochs.
  c.optimizer = "sgd"  # optim.OPTIMIZERS
  c.learning_rate = 0.01
  c.base_batch_size = 0  # > 0: lr scales linearly with batch_size / base_batch_size.
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 5e-4
  c.schedule = "step"  # optim.SCHEDULES
  c.warmup_epochs = 0.0
  c.warmup_steps = -1  # >= 0 wins over warmup_epochs.
  c.decay_epochs = ()  # step schedule: multiply by decay_factor at these epochs...
  c.decay_steps = ()  # ...or at these steps (wins when not empty).
  c.decay_factor = 0.1
  c.bias_lr_mult = 2.0  # Caffe: biases learn 2x faster...
  c.bias_weight_decay = False  # ...and get no weight decay.
  c.layer_lr_mults = ml_collections.ConfigDict()  # e.g. {"cccp6": 0.1}
  c.label_smoothing = 0.0
  # Bookkeeping.
  c.seed = 0
  c.log_every_steps = 50
  c.eval_every_steps = 0  # 0 = once per epoch; < 0 = only at the end.
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval_batch_size = 512  # Rounded up to a multiple of the device count; padding is masked.
  c.stuck_loss_steps = 300  # Warn when the loss sits at ln(num_classes) this long.
  # Resuming: a rerun may change only lineage.SAFE_TO_CHANGE keys, plus these (comma-separated).
  c.allow_changes = ""
  c.restore_step = -1  # >= 0: resume from this checkpoint instead of the latest (a branch).
  return c


def allowed_changes(config: ml_collections.ConfigDict) -> set[str]:
  """The keys named in `allow_changes` (comma-separated)."""
  return {k.strip() for k in config.allow_changes.split(",") if k.strip()}


def model_config(config: ml_collections.ConfigDict):
  """The config's variant (a `models.ModelConfig`) with its data set's classes and channels,
  checked to fit its images. Here, not in `models`, so that the model knows no data set."""
  from nin_jax.data import datasets
  from nin_jax.model import models

  info = datasets.get_info(config.dataset)
  synthetic = config.dataset == "synthetic"
  try:
    spec = models.get_spec(
      config.model,
      num_classes=None if synthetic else info.num_classes,
      in_channels=None if synthetic else info.channels,
      pool2=config.pool2 or None,
      dropout=models.dropout_of(config),
    )
    image_size = config.image_size or (spec.image_size if synthetic else info.image_size)
    models.feature_map_size(spec, image_size)
  except ValueError as e:
    raise ConfigError(f"{e} (model {config.model} on dataset {config.dataset})") from e
  return models.ModelConfig(spec, image_size, config)


def _validate_choices(config: ml_collections.ConfigDict) -> None:
  """Every key known, every named choice one that its module implements."""
  from nin_jax import optim  # Local: config files stay JAX-free.
  from nin_jax.data import datasets, input_pipeline
  from nin_jax.model import layers, models

  choices = {
    "head": models.HEADS,
    "init": models.INITS,
    "dtype": tuple(models.DTYPES),
    "optimizer": optim.OPTIMIZERS,
    "schedule": optim.SCHEDULES,
    "pool2": ("", *layers.POOL_KINDS),
  }
  unknown = sorted(set(config.keys()) - set(default_config().keys()))
  if unknown:
    raise ConfigError(
      f"Unknown config key(s) {', '.join(unknown)}; valid keys are listed in nin_jax/configs.py:default_config()."
    )
  if config.dataset not in datasets.DATASETS:
    raise ConfigError(f"Unknown dataset {config.dataset!r}; choose one of: {', '.join(datasets.DATASETS)}.")
  if config.model not in models.VARIANTS:
    raise ConfigError(f"Unknown model {config.model!r}; choose one of: {', '.join(models.VARIANTS)}.")
  for key, valid in choices.items():
    if config[key] not in valid:
      raise ConfigError(
        f"Unknown {key} {config[key]!r}; choose one of: {', '.join(repr(c) if not c else c for c in valid)}."
      )
  if datasets.DATASETS[config.dataset].in_memory:
    augments, preprocesses = input_pipeline.AUGMENTS, input_pipeline.PREPROCESSES
  else:
    from nin_jax.data import imagenet  # TensorFlow; only for the streaming data set.

    augments, preprocesses = imagenet.AUGMENTS, imagenet.PREPROCESSES
  if config.augment not in augments:
    raise ConfigError(f"Unknown augment {config.augment!r} for {config.dataset}; choose one of: {', '.join(augments)}.")
  if config.preprocess not in preprocesses:
    raise ConfigError(
      f"Unknown preprocess {config.preprocess!r} for {config.dataset}; choose one of: {', '.join(preprocesses)}."
    )


def validate(config: ml_collections.ConfigDict, device_count: int, process_count: int = 1) -> None:
  """Raises ConfigError, in one sentence saying what to change, for any invalid setting."""
  from nin_jax.data import datasets  # pylint: disable=g-import-not-at-top

  _validate_choices(config)
  info = datasets.DATASETS[config.dataset]
  if not isinstance(config.batch_size, int) or config.batch_size <= 0:
    raise ConfigError(f"batch_size must be a positive integer, got {config.batch_size!r}.")
  if config.batch_size % device_count:
    raise ConfigError(
      f"batch_size {config.batch_size} is not divisible by the {device_count} devices; "
      f"use a multiple of {device_count}."
    )
  if not isinstance(config.eval_batch_size, int) or config.eval_batch_size <= 0:
    raise ConfigError(f"eval_batch_size must be a positive integer, got {config.eval_batch_size!r}.")
  if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
    raise ConfigError(f"seed must be a non-negative integer, got {config.seed!r}.")
  if info.in_memory and config.dataset != "synthetic" and config.image_size not in (0, info.image_size):
    raise ConfigError(
      f"image_size {config.image_size} cannot apply to {config.dataset}, whose images are "
      f"{info.image_size}x{info.image_size} and are not resized; leave image_size at 0."
    )
  if config.validation_examples and not (info.in_memory and config.dataset != "synthetic"):
    raise ConfigError(
      f"validation_examples holds out training images of the in-memory data sets only, "
      f"not {config.dataset}; leave it at 0."
    )
  if config.batch_size % process_count:
    raise ConfigError(f"batch_size {config.batch_size} is not divisible by the {process_count} hosts.")
  lr = config.learning_rate
  if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
    raise ConfigError(f"learning_rate must be a positive finite number, got {lr!r}.")
  if config.num_train_steps <= 0 and not config.num_epochs > 0:
    raise ConfigError("Set num_epochs > 0 or num_train_steps > 0.")
  unknown = sorted(allowed_changes(config) - set(default_config().keys()))
  if unknown:
    raise ConfigError(
      f"allow_changes names unknown config key(s) {', '.join(unknown)}; name keys of "
      "nin_jax/configs.py:default_config(), separated by commas."
    )
  for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    if config[key] <= 0:
      raise ConfigError(f"{key} must be positive, got {config[key]}.")
