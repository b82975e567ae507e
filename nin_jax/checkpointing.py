"""Orbax checkpoints in `<workdir>/checkpoints`, one directory per step.

Orbax writes each checkpoint to a temporary directory and renames it when it is
complete, so a run killed mid-save never leaves a half-written step behind.
`restore_latest` also survives a latest checkpoint that was damaged afterwards:
it warns and falls back to the previous one.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def make_manager(workdir: str, *, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, host_state: dict) -> None:
  """Saves the device `state` and the JSON-able `host_state` (partial metric sums) at
  `step`, and waits until both are on disk. A step that is already there can only be
  one `restore_latest` skipped as damaged, so it is replaced."""
  if step in manager.all_steps():
    manager.delete(step)
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host_state)), force=True)
  manager.wait_until_finished()


def restore_latest(manager: ocp.CheckpointManager, abstract_state, warn=print):
  """The newest checkpoint that restores cleanly, as (state, host_state, step), or (None, None, 0).

  `abstract_state` carries shapes, dtypes and shardings, so arrays come back
  already placed on the mesh.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), host=ocp.args.JsonRestore()))
      jax.block_until_ready(restored.state)
      return restored.state, restored.host, step
    except Exception as e:  # A damaged checkpoint can fail in many ways; try an older one.
      warn(f"warning: checkpoint at step {step} could not be restored "
           f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
           "trying the previous one.")
  return None, None, 0
