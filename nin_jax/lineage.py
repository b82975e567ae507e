"""Which config made a workdir, and which changes a rerun in it may make.

A rerun in an existing workdir resumes its checkpoints. If its settings change the
trained function or the order of the data (model, head, batch size, learning rate,
data set, ...), resuming would silently splice two different runs into one set of
checkpoints and one `metrics.jsonl`. So the workdir remembers its config:

- `config.json` is the config of the first segment and is never rewritten;
- `config_history.jsonl` gets one line per later segment that changed anything:
  the step it started from and each changed key with its old and new value.

A rerun may change the keys in `SAFE_TO_CHANGE` (how long to train, how often to
log, evaluate and save, where the data lives); any other change stops the run with
one line naming every differing key, unless the user branches on purpose with
`--config.allow_changes=key,...` (e.g. a lower learning rate after a divergence).
"""

from __future__ import annotations

import json

from etils import epath

from nin_jax import configs
from nin_jax.errors import ConfigError
from nin_jax.run import workdir as workdir_lib

HISTORY_FILE = "config_history.jsonl"
SAFE_TO_CHANGE = frozenset(
  {
    "num_train_steps",
    "num_epochs",  # Longer or shorter; a cosine schedule re-stretches (said).
    "log_every_steps",
    "eval_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "eval_batch_size",
    "eval_examples",
    "stuck_loss_steps",  # What is reported, not what is trained.
    "data_dir",
    "manual_dir",
    "download",
    "idx_dir",  # Where the same data comes from.
  }
)
_NOT_RECORDED = frozenset({"allow_changes", "restore_step"})  # Instructions for one rerun.


def effective_config(path: epath.Path) -> dict | None:
  """The config the workdir's latest segment ran with: config.json plus the recorded changes."""
  first = path / workdir_lib.CONFIG_FILE
  if not first.exists():
    return None
  config = json.loads(first.read_text())
  history = path / HISTORY_FILE
  if history.exists():
    for line in history.read_text().splitlines():
      config.update({k: change["to"] for k, change in json.loads(line)["changes"].items()})
  return config


def branch_taken(path: epath.Path, restore_step: int) -> bool:
  """Whether the last branch recorded in the workdir started at `restore_step` (and saved): a
  rerun of the command that made it must resume the branch, not branch again."""
  history = path / HISTORY_FILE
  if not history.exists():
    return False
  branches = [e for e in map(json.loads, history.read_text().splitlines()) if e.get("branched")]
  return bool(branches) and branches[-1]["from_step"] == restore_step


def _json_value(value):
  return json.loads(json.dumps(value))  # Tuples as lists, as config.json holds them.


def changes(path: epath.Path, config) -> dict[str, dict] | None:
  """The keys this rerun changes ({key: {"from": old, "to": new}}), or None for a new workdir.

  Raises ConfigError, before anything is written, for a change that is neither safe
  nor allowed.
  """
  previous = effective_config(path)
  if previous is None:
    return None
  new = _json_value(config.to_dict())
  # A key added to the code after the workdir was made ran at its default there.
  previous = {**_json_value(configs.default_config().to_dict()), **previous}
  diffs = {
    k: {"from": previous.get(k), "to": new.get(k)}
    for k in sorted(set(previous) | set(new))
    if previous.get(k) != new.get(k) and k not in _NOT_RECORDED
  }
  refused = [k for k in diffs if k not in SAFE_TO_CHANGE and k not in configs.allowed_changes(config)]
  if refused:
    listed = "; ".join(f"{k} was {diffs[k]['from']!r}, now {diffs[k]['to']!r}" for k in refused)
    raise ConfigError(
      f"{path} holds a run with other settings ({listed}); resuming would mix two runs. Use a new "
      f"--workdir, or branch this run on purpose with --config.allow_changes={','.join(refused)}."
    )
  return diffs


def record(path: epath.Path, config, diffs: dict | None, from_step: int, say=print, branched: bool = False) -> None:
  """Writes config.json for a new workdir, or appends this segment's changes to the history
  (`branched`: it resumed an earlier checkpoint than the latest, on purpose)."""
  if diffs is None:
    workdir_lib.write_config(path, _json_value(config.to_dict()))
    return
  if not diffs and not branched:
    return
  history = path / HISTORY_FILE
  entry = {"from_step": from_step, "changes": diffs, **({"branched": True} if branched else {})}
  line = json.dumps(entry) + "\n"
  workdir_lib.write_text(history, (history.read_text() if history.exists() else "") + line)
  for key, change in diffs.items():
    say(f"changed from step {from_step}: {key} {change['from']!r} -> {change['to']!r}")
  if config.schedule == "cosine" and {"num_train_steps", "num_epochs"} & set(diffs):
    say(
      "note: the cosine learning-rate schedule now stretches over the new length, so from step "
      f"{from_step} on the learning rate differs from the one the earlier segment followed."
    )
