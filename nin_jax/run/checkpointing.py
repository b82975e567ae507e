"""Orbax checkpoints in `<workdir>/checkpoints`, one directory per step, on any filesystem.

Orbax writes each checkpoint to a temporary directory and commits it when it is
complete (a rename on a local disk, a commit marker on GCS), so a run killed
mid-save never leaves a half-written step behind. `restore` also survives a
latest checkpoint that was damaged afterwards: it warns and falls back to the
previous one. `restore_params` gives notebooks and tests a trained model.
"""

from __future__ import annotations

import contextlib
import logging
import sys

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from nin_jax.errors import ConfigError, DataError, SaveFailed, TrainingDiverged
from nin_jax.run import workdir as workdir_lib


def make_manager(workdir: str | epath.Path, *, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(workdir_lib.resolve(workdir) / "checkpoints", options=options)


def save(manager: ocp.CheckpointManager, step: int, state, host_state: dict) -> None:
  """Saves the device `state` and the JSON-able `host_state` (partial metric sums) at
  `step`, and waits until both are stored.

  Steps at or after `step` can only be a damaged one that `restore` skipped or those of
  a branch abandoned with `restore_step`: this run's checkpoint replaces them, so that
  the latest checkpoint is always this run's.
  """
  try:
    with _logs_held_until_success():
      for stale in sorted(s for s in manager.all_steps() if s >= step):
        manager.delete(stale)
      manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host_state)),
        force=True,
      )
      manager.wait_until_finished()
  except Exception as e:  # Orbax wraps OS errors in many types; the reason is in the text.
    _remove_partial(manager, step)
    kept = sorted(s for s in manager.all_steps() if s < step)
    raise SaveFailed(
      f"Could not save the checkpoint at step {step} in {manager.directory} ({_reason(e)}); the checkpoints "
      f"at steps {', '.join(map(str, kept)) or '(none yet)'} are intact. Free space or make it writable, "
      "then run the same command to resume."
    ) from e


@contextlib.contextmanager
def _logs_held_until_success():
  """Holds Orbax's (absl) and asyncio's log records during a save and lets them out if it
  succeeds. A failed save makes every worker thread log its traceback (~450 lines for a
  full disk), and its threads go on failing while the run closes: after a failure the
  records stay held, and the one-line SaveFailed says what they would."""
  held: list[logging.LogRecord] = []
  hold = logging.Filter()
  hold.filter = lambda record: held.append(record) and False  # Keep the record, emit nothing.
  loggers = [logging.getLogger("absl"), logging.getLogger("asyncio")]
  for logger in loggers:
    logger.addFilter(hold)
  unraisable, hook = [], sys.unraisablehook  # Errors in TensorStore's callbacks land here.
  sys.unraisablehook = unraisable.append
  yield  # On an exception, everything stays held: the run is over.
  for logger in loggers:
    logger.removeFilter(hold)
  sys.unraisablehook = hook
  for record in held:  # Only reached after a successful save.
    logging.getLogger(record.name).handle(record)
  for item in unraisable:
    hook(item)


_OS_REASONS = ("No space left on device", "Read-only file system", "Permission denied", "Disk quota exceeded")


def _reason(error: BaseException) -> str:
  """The OS's reason for a failed save, found anywhere in Orbax's chain of wrapped errors."""
  chain, seen = [error], set()
  while chain:
    e = chain.pop()
    if id(e) in seen:
      continue
    seen.add(id(e))
    for reason in _OS_REASONS:
      if reason in str(e):
        return reason
    chain += [x for x in (e.__cause__, e.__context__) if x is not None]
  return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def _remove_partial(manager: ocp.CheckpointManager, step: int) -> None:
  """Deletes the uncommitted temporary directory of a failed save: it holds nothing
  restorable and, on a full disk, the space the user needs back."""
  for partial in manager.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
    try:
      partial.rmtree()
    except OSError:
      pass  # Read-only storage: Orbax ignores an uncommitted directory anyway.


def _leaf_shapes(tree) -> list[tuple]:
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
  return sorted((tuple(x.shape), str(x.dtype)) for x in leaves)


def _saved_state_metadata(manager: ocp.CheckpointManager, step: int):
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # Orbax warns that a file of the (complete) step is absent.
  try:
    return ocp.StandardCheckpointer().metadata(manager.directory / str(step) / "state").item_metadata
  finally:
    absl_logger.setLevel(level)


def restore(manager: ocp.CheckpointManager, abstract_state, warn=print, wanted: int | None = None):
  """Checkpoint `wanted` (`restore_step`), else the newest that restores cleanly, as
  (state, host_state, step), or (None, None, 0) in a new workdir.

  `abstract_state` carries shapes, dtypes and shardings, so arrays come back
  already placed on the mesh. A checkpoint whose arrays have other shapes than the
  model's was saved by another model: that is a ConfigError, never damage (falling
  back past it would train a new model over the old run's checkpoints).
  """
  expected = _leaf_shapes(abstract_state)
  steps = sorted(manager.all_steps(), reverse=True)
  if wanted is not None and wanted not in steps:
    raise ConfigError(
      f"restore_step {wanted} is not a checkpoint in {manager.directory}; the checkpoints are "
      f"at steps {', '.join(map(str, sorted(steps))) or 'none'}."
    )
  for step in [wanted] if wanted is not None else steps:
    try:
      saved = _leaf_shapes(_saved_state_metadata(manager, step))
    except Exception:  # pylint: disable=broad-except  # Unreadable: damaged; the restore below says so.
      saved = []
    if saved and saved != expected:  # No metadata at all is damage, too.
      raise ConfigError(
        f"The checkpoint at step {step} in {manager.directory} was saved by another model ({len(saved)} "
        f"arrays; this config's has {len(expected)} or other shapes); a model cannot change within a "
        "run: use a new --workdir."
      )
    try:
      restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), host=ocp.args.JsonRestore())
      )
      jax.block_until_ready(restored.state)
      return restored.state, restored.host, step
    except Exception as e:  # A damaged checkpoint can fail in many ways; try an older one.
      reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
      if wanted is not None:
        raise DataError(
          f"The checkpoint at step {wanted} cannot be restored ({reason}); choose another --config.restore_step."
        ) from e
      warn(f"warning: checkpoint at step {step} could not be restored ({reason}); trying the previous one.")
  return None, None, 0


def diverged_error(what: str, manager: ocp.CheckpointManager) -> TrainingDiverged:
  """The error for a diverged run: what happened, what is kept, how to go on from it.

  Only finite states are ever saved, but a finite one may already be far off: the
  message lists every checkpoint so the user can go back further than the last.
  """
  steps = sorted(manager.all_steps())
  if not steps:
    return TrainingDiverged(
      f"{what}; no checkpoint was saved yet. Lower --config.learning_rate or add "
      "warm-up (--config.warmup_epochs) and start again."
    )
  return TrainingDiverged(
    f"{what}; the checkpoints are kept, at steps {', '.join(map(str, steps))} (all finite). Go on from one "
    f"of them with a lower learning rate, e.g. --config.restore_step={steps[0]} "
    "--config.learning_rate=LOWER --config.allow_changes=learning_rate (the later checkpoints are kept "
    "until that run saves its first), or start a new --workdir."
  )


def _pure_dict(tree):
  """Orbax's untyped restore of an nnx.State: list indices become strings and each
  variable a {'value': array} dict; undo both for `nnx.replace_by_pure_dict`."""
  if isinstance(tree, dict):
    if set(tree) == {"value"}:
      return _pure_dict(tree["value"])
    return {int(k) if isinstance(k, str) and k.isdigit() else k: _pure_dict(v) for k, v in tree.items()}
  return tree


def restore_params(workdir: str | epath.Path, model: nnx.Module, *, keep: int, step: int | None = None) -> int:
  """Fills `model`'s parameters from the checkpoint at `step` in `workdir` (default: the
  latest); returns its step.

  `model` may be abstract (`nnx.eval_shape`): only its structure is used. Restores onto this
  process's first device, whatever topology the run was saved from.
  """
  manager = make_manager(workdir, keep=keep)
  try:
    if step is None:
      step = manager.latest_step()
    if step is None:
      raise DataError(f"No checkpoint in {manager.directory}; train first.")
    if step not in manager.all_steps():
      raise DataError(f"No checkpoint at step {step} in {manager.directory}; it has {sorted(manager.all_steps())}.")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    saved = _saved_state_metadata(manager, step)
    target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved, is_leaf=lambda m: hasattr(m, "shape")
    )
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  finally:
    manager.close()
  params = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(params, _pure_dict(restored.state["params"]))
  nnx.update(model, params)
  return step
