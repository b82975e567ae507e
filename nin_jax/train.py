"""The trainer: one jitted, sharded train step; exact evaluation; resumable checkpoints.

`train_and_evaluate(config, workdir)` is the whole job; `main.py` only parses flags.
The global batch is sharded over a 1-D `data` mesh of every device of every host,
parameters are replicated, and the train state is created already sharded and
donated to each step. Dropout keys are `fold_in(key, step)` and batches are a
function of (seed, step), so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nin_jax import checkpointing, configs, datasets, input_pipeline, models, optim, reporting
from nin_jax.errors import ConfigError, DataError, Interrupted, TrainingDiverged


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class Data:
  """Train batches by step, and a re-iterable eval split."""
  train_batches: Callable[[int], Iterator[input_pipeline.Batch]]  # start step -> batches
  eval_batches: Callable[[], Iterator[input_pipeline.Batch]]
  num_train_examples: int
  num_eval_examples: int


def _array_data(config, train, eval_x: np.ndarray, eval_y: np.ndarray, num_train: int,
                pidx: int, pcount: int) -> Data:
  """Data from a train source with `.batch(step)` and an in-memory eval split."""
  return Data(
      train_batches=lambda start: (train.batch(s) for s in range(start, 2**62)),
      eval_batches=lambda: input_pipeline.eval_batches(
          eval_x, eval_y, global_batch=config.eval_batch_size, process_index=pidx, process_count=pcount),
      num_train_examples=num_train, num_eval_examples=len(eval_x))


def _in_memory_data(config, pidx: int, pcount: int) -> Data:
  arrays = datasets.load_arrays(config.dataset, data_dir=config.data_dir or None,
                                download=config.download)
  train_x, train_y = arrays.train_images, arrays.train_labels
  eval_x, eval_y = arrays.eval_images, arrays.eval_labels
  if config.train_examples > 0:
    train_x, train_y = train_x[:config.train_examples], train_y[:config.train_examples]
  if config.eval_examples > 0:
    eval_x, eval_y = eval_x[:config.eval_examples], eval_y[:config.eval_examples]
  train_x, eval_x = input_pipeline.preprocess(train_x, eval_x, config.preprocess)
  train = input_pipeline.InMemoryTrain(
      train_x, train_y, global_batch=config.batch_size, seed=config.seed,
      augment_method=config.augment, process_index=pidx, process_count=pcount)
  return _array_data(config, train, eval_x, eval_y, len(train_x), pidx, pcount)


def _synthetic_data(config, spec: models.ModelSpec, image_size: int, pidx: int, pcount: int) -> Data:
  shape = (image_size, image_size, spec.in_channels)
  train = input_pipeline.SyntheticTrain(image_shape=shape, num_classes=spec.num_classes,
                                        global_batch=config.batch_size, seed=config.seed,
                                        process_index=pidx, process_count=pcount)
  eval_x, eval_y = input_pipeline.synthetic_eval(image_shape=shape, num_classes=spec.num_classes,
                                                 num_examples=config.eval_examples or 1000, seed=config.seed)
  num_train = config.train_examples or config.batch_size * train.steps_per_epoch
  return _array_data(config, train, eval_x, eval_y, num_train, pidx, pcount)


def make_data(config, spec: models.ModelSpec, image_size: int) -> Data:
  info = datasets.get_info(config.dataset)
  pidx, pcount = jax.process_index(), jax.process_count()
  if config.dataset == "synthetic":
    return _synthetic_data(config, spec, image_size, pidx, pcount)
  if info.in_memory:
    return _in_memory_data(config, pidx, pcount)
  from nin_jax import imagenet  # tf.data streaming; imported only when used.
  return imagenet.make_data(config, image_size, pidx, pcount, Data)


# ----------------------------------------------------------------------------- steps


def _correct_counts(logits: jax.Array, labels: jax.Array, mask: jax.Array, top5: bool):
  top1 = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * mask
  out = {"correct": top1.sum()}
  if top5:
    in_top5 = (jax.lax.top_k(logits, 5)[1] == labels[:, None]).any(-1).astype(jnp.float32) * mask
    out["correct_top5"] = in_top5.sum()
  return out


def make_train_step(graphdef, tx: optax.GradientTransformation, *, seed: int, num_classes: int,
                    label_smoothing: float, top5: bool):
  dropout_root = jax.random.fold_in(jax.random.key(seed), 1)

  def train_step(state, images, labels):
    step = state["step"]

    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(
          images, train=True, dropout_key=jax.random.fold_in(dropout_root, step))
      targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
      return optax.softmax_cross_entropy(logits, targets).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, **_correct_counts(logits, labels, jnp.ones_like(loss, shape=labels.shape), top5)}
    return {"params": params, "opt_state": opt_state, "step": step + 1}, metrics

  return train_step


def make_eval_step(graphdef, *, top5: bool):
  def eval_step(params, images, labels, mask):
    logits = nnx.merge(graphdef, params)(images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {"loss_sum": (loss * mask).sum(), "count": mask.sum(),
            **_correct_counts(logits, labels, mask, top5)}

  return eval_step


# ----------------------------------------------------------------------------- setup


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model a config asks for, resolved against its data set."""
  spec: models.ModelSpec
  image_size: int
  config: ml_collections.ConfigDict

  def build(self, rngs: nnx.Rngs) -> models.NIN:
    c = self.config
    return models.create_model(c.model, num_classes=self.spec.num_classes, head=c.head, init=c.init,
                               dtype=c.dtype, image_size=self.image_size, in_channels=self.spec.in_channels,
                               pool2=c.pool2 or None, dropout=_dropout(c), rngs=rngs)


def _dropout(config) -> float | None:
  return None if config.dropout < 0 else float(config.dropout)


def model_from_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The variant with the data set's classes and channels, checked to fit its images."""
  info = datasets.get_info(config.dataset)
  synthetic = config.dataset == "synthetic"
  try:
    spec = models.get_spec(config.model, num_classes=None if synthetic else info.num_classes,
                           in_channels=None if synthetic else info.channels, pool2=config.pool2 or None,
                           dropout=_dropout(config))
    image_size = config.image_size or (spec.image_size if synthetic else info.image_size)
    models.feature_map_size(spec, image_size)
  except ValueError as e:
    raise ConfigError(f"{e} (model {config.model} on dataset {config.dataset})") from e
  return ModelConfig(spec, image_size, config)


def _prepare_workdir(workdir: str) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"workdir {workdir} is a file; pass a directory to --workdir.")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"workdir {workdir} cannot be written ({e.strerror}); "
                      "choose a writable --workdir.") from e


def total_train_steps(config, num_train_examples: int) -> tuple[int, int]:
  steps_per_epoch = max(num_train_examples // config.batch_size, 1)
  if config.num_train_steps > 0:
    return config.num_train_steps, steps_per_epoch
  return max(int(math.ceil(config.num_epochs * steps_per_epoch)), 1), steps_per_epoch


def _global(sharding: NamedSharding, local: np.ndarray, global_batch: int) -> jax.Array:
  return jax.make_array_from_process_local_data(sharding, local, (global_batch, *local.shape[1:]))


class _SignalFlag:
  """Remembers SIGTERM/SIGINT so the loop can finish its step and save first."""

  def __init__(self, reporter: reporting.Reporter):
    self.signum, self._reporter, self._previous = None, reporter, {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread (e.g. a notebook worker): no handler.
        pass
    return self

  def _handle(self, signum, frame):
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C stops at once.
    self.signum = signum
    self._reporter.print(f"received {signal.Signals(signum).name}: finishing this step and saving a checkpoint")

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def any_process(self) -> bool:
    local = self.signum is not None
    if jax.process_count() == 1:
      return local
    return bool(multihost_utils.process_allgather(np.array(local)).any())


def make_optimizer(config, spec: models.ModelSpec, abstract_params, num_steps: int,
                   steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The config's optimizer and schedule; epochs become steps, lr scales with the batch."""
  learning_rate = config.learning_rate * (
      config.batch_size / config.base_batch_size if config.base_batch_size > 0 else 1.0)
  schedule = optim.make_schedule(
      name=config.schedule, learning_rate=learning_rate, total_steps=num_steps,
      warmup_steps=int(round(config.warmup_epochs * steps_per_epoch)),
      decay_steps=tuple(int(round(e * steps_per_epoch)) for e in config.decay_epochs),
      decay_factor=config.decay_factor)
  try:
    lr_mults, decay_mask = optim.caffe_multipliers(
        abstract_params, spec, bias_lr_mult=config.bias_lr_mult,
        bias_weight_decay=config.bias_weight_decay, layer_lr_mults=dict(config.layer_lr_mults))
  except ValueError as e:
    raise ConfigError(str(e)) from e
  tx = optim.make_optimizer(name=config.optimizer, schedule=schedule, weight_decay=config.weight_decay,
                            momentum=config.momentum, nesterov=config.nesterov,
                            lr_mults=lr_mults, decay_mask=decay_mask)
  return tx, schedule


def evaluate(eval_step, params, batches: Iterator[input_pipeline.Batch], sharding: NamedSharding,
             global_batch: int, top5: bool) -> dict[str, float]:
  """Top-1 (top-5) accuracy and loss over every real example; padding rows have mask 0."""
  sums: dict[str, float] = {}
  for batch in batches:
    out = eval_step(params, *(_global(sharding, a, global_batch) for a in (batch.images, batch.labels, batch.mask)))
    for k, v in jax.device_get(out).items():
      sums[k] = sums.get(k, 0.0) + float(v)
  count = int(sums["count"])
  metrics = {"eval_accuracy": sums["correct"] / count, "eval_loss": sums["loss_sum"] / count,
             "eval_examples": count}
  if top5:
    metrics["eval_top5_accuracy"] = sums["correct_top5"] / count
  return metrics


# ----------------------------------------------------------------------------- the job


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices: list[jax.Device] | None = None) -> dict[str, float]:
  """Trains and evaluates as `config` says, writing everything to `workdir`.

  Resumes from the latest complete checkpoint in `workdir`. Returns the final
  evaluation metrics. Raises a `UserError` subclass for anything the user can fix.
  `devices` (default: all devices of all hosts) form the `data` mesh axis.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  devices = list(devices) if devices is not None else jax.devices()
  configs.validate(config, len(devices), jax.process_count())
  # Eval batches are padded and masked anyway, so any size can round up to fit the mesh.
  config.eval_batch_size = -(-config.eval_batch_size // len(devices)) * len(devices)
  _prepare_workdir(workdir)
  is_main = jax.process_index() == 0

  model_config = model_from_config(config)
  spec, image_size = model_config.spec, model_config.image_size
  data = make_data(config, spec, image_size)
  num_steps, steps_per_epoch = total_train_steps(config, data.num_train_examples)
  eval_every = {0: steps_per_epoch}.get(config.eval_every_steps, config.eval_every_steps)
  eval_every = eval_every if eval_every > 0 else num_steps  # < 0: only at the end.
  top5 = spec.num_classes >= 100

  mesh = Mesh(np.array(devices), ("data",))
  replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

  build_model = model_config.build
  graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: build_model(nnx.Rngs(0))))
  tx, schedule = make_optimizer(config, spec, abstract_params, num_steps, steps_per_epoch)

  def init_state():
    params = nnx.state(build_model(nnx.Rngs(config.seed)), nnx.Param)
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  abstract_state = jax.eval_shape(init_state)
  state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sharding)

  reporter = reporting.Reporter(workdir, total_steps=num_steps, enabled=is_main)
  manager = checkpointing.make_manager(workdir, keep=config.keep_checkpoints)
  state, host_state, start_step = checkpointing.restore_latest(manager, abstract_state, warn=reporter.print)
  if state is None:
    state = jax.jit(init_state, out_shardings=state_sharding)()  # Created already sharded.
    host_state = {}
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(abstract_params))
    reporter.print(f"starting from scratch: {num_params:,} parameters")
  else:
    reporter.print(f"resumed from the checkpoint at step {start_step}")
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2, sort_keys=True)
  reporter.print(
      f"{config.model}/{config.head} on {config.dataset}: {data.num_train_examples:,} train and "
      f"{data.num_eval_examples:,} eval examples, {num_steps:,} steps of {config.batch_size} "
      f"({num_steps / steps_per_epoch:.2f} epochs) on {len(devices)} {devices[0].platform} "
      f"device(s), {jax.process_count()} host(s)")

  train_step = jax.jit(
      make_train_step(graphdef, tx, seed=config.seed, num_classes=spec.num_classes,
                      label_smoothing=config.label_smoothing, top5=top5),
      in_shardings=(state_sharding, batch_sharding, batch_sharding),
      out_shardings=(state_sharding, replicated), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(graphdef, top5=top5),
                      in_shardings=(state_sharding["params"], batch_sharding, batch_sharding, batch_sharding),
                      out_shardings=replicated)

  def run_eval(step: int) -> dict[str, float]:
    metrics = evaluate(eval_step, state["params"], data.eval_batches(), batch_sharding,
                       config.eval_batch_size, top5)
    reporter.write(step, metrics)
    reporter.print(f"eval at step {step}: top-1 {100 * metrics['eval_accuracy']:.2f}% "
                   + (f"top-5 {100 * metrics['eval_top5_accuracy']:.2f}% " if top5 else "")
                   + f"loss {metrics['eval_loss']:.4f} on {metrics['eval_examples']:,} examples")
    return metrics

  # Partial sums of the current log window live in checkpoints, so a resumed run
  # logs exactly what the uninterrupted run logs.
  window = host_state.get("window", {"loss": 0.0, "correct": 0.0, "correct_top5": 0.0, "steps": 0})
  stuck_steps = int(host_state.get("stuck_steps", 0))
  chance_loss = math.log(spec.num_classes)
  eval_metrics: dict[str, float] = {}
  step = start_step
  last_saved = start_step if start_step else None
  tick, images_seen = time.perf_counter(), 0

  def save(at_step):
    nonlocal last_saved
    checkpointing.save(manager, at_step, state, {"window": window, "stuck_steps": stuck_steps})
    last_saved = at_step

  try:
    with _SignalFlag(reporter) as stop:
      batches = data.train_batches(start_step)
      while step < num_steps:
        batch = next(batches)
        state, metrics = train_step(state, _global(batch_sharding, batch.images, config.batch_size),
                                    _global(batch_sharding, batch.labels, config.batch_size))
        metrics = jax.device_get(metrics)
        step += 1
        images_seen += config.batch_size
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
          raise TrainingDiverged(
              f"The loss became {loss} at step {step}; the last good checkpoint "
              f"({'step ' + str(last_saved) if last_saved else 'none yet'}) is kept. "
              "Lower --config.learning_rate or add warm-up (--config.warmup_epochs).")
        window["loss"] += loss
        window["correct"] += float(metrics["correct"])
        window["correct_top5"] += float(metrics.get("correct_top5", 0.0))
        window["steps"] += 1
        stuck_steps = stuck_steps + 1 if abs(loss - chance_loss) < 0.01 else 0
        if stuck_steps == config.stuck_loss_steps:
          reporter.print(
              f"warning: the loss has stayed at ln({spec.num_classes})={chance_loss:.4f} for "
              f"{stuck_steps} steps: the last ReLU has likely died, so every logit is 0 (NIN's known "
              "failure). Use --config.init=he, a lower learning rate or warm-up, or another seed.")
        if step % config.log_every_steps == 0 or step == num_steps:
          elapsed = time.perf_counter() - tick
          n = window["steps"] * config.batch_size
          logged = {"train_loss": window["loss"] / window["steps"], "train_accuracy": window["correct"] / n,
                    "learning_rate": float(schedule(step - 1)), "images_per_sec": images_seen / elapsed,
                    "epoch": step / steps_per_epoch}
          if top5:
            logged["train_top5_accuracy"] = window["correct_top5"] / n
          reporter.write(step, logged)
          reporter.progress(step, logged, steps_per_second=images_seen / elapsed / config.batch_size)
          window = {"loss": 0.0, "correct": 0.0, "correct_top5": 0.0, "steps": 0}
          tick, images_seen = time.perf_counter(), 0
        interrupted = stop.any_process()
        if step % config.checkpoint_every_steps == 0 or step == num_steps or interrupted:
          save(step)
        if interrupted:
          raise Interrupted(f"Stopped by {signal.Signals(stop.signum or signal.SIGTERM).name} at step "
                            f"{step}; checkpoint saved. Run the same command to resume.",
                            stop.signum or signal.SIGTERM)
        if step % eval_every == 0 or step == num_steps:
          pause = time.perf_counter()
          eval_metrics = run_eval(step)
          tick += time.perf_counter() - pause  # Evaluation time is not training throughput.
      if not eval_metrics:  # Resumed after the last step: report the final accuracy again.
        eval_metrics = run_eval(step)
  finally:  # Also on errors and interrupts: flush the logs, finish any save.
    manager.close()
    reporter.close()
  return eval_metrics


def _pure_dict(tree):
  """Orbax's untyped restore of an nnx.State: list indices become strings and each
  variable a {'value': array} dict; undo both for `nnx.replace_by_pure_dict`."""
  if isinstance(tree, dict):
    if set(tree) == {"value"}:
      return _pure_dict(tree["value"])
    return {int(k) if isinstance(k, str) and k.isdigit() else k: _pure_dict(v) for k, v in tree.items()}
  return tree


def load_model(workdir: str, config: ml_collections.ConfigDict) -> tuple[models.NIN, int]:
  """The model of the latest checkpoint in `workdir`, and its step (for notebooks, tests)."""
  manager = checkpointing.make_manager(workdir, keep=config.keep_checkpoints)
  step = manager.latest_step()
  if step is None:
    raise DataError(f"No checkpoint in {workdir}/checkpoints; train first.")
  # Onto this process's first device, whatever topology the checkpoint was saved from.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  saved = checkpointing.ocp.StandardCheckpointer().metadata(
      os.path.join(manager.directory, str(step), "state")).item_metadata
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved,
                        is_leaf=lambda m: hasattr(m, "shape"))
  restored = manager.restore(step, args=checkpointing.ocp.args.Composite(
      state=checkpointing.ocp.args.StandardRestore(target)))
  model = model_from_config(config).build(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(params, _pure_dict(restored.state["params"]))
  nnx.update(model, params)
  manager.close()
  return model, step
