"""The workdir on any filesystem: a local directory, `gs://bucket/dir`, or another URL.

Every file the trainer reads or writes under `--workdir` goes through `etils.epath`
(which Orbax uses too), so a pod slice whose hosts share no disk writes to one bucket.

`gs://` goes through `gcsfs`, not `tf.io.gfile`: importing this module sets
`EPATH_USE_TF=false` unless the user set it. gcsfs (with `google-cloud-storage`,
which Orbax and tensorboardX use on GCS) honours `STORAGE_EMULATOR_HOST`, so the
path users take on Cloud TPU is the one the offline emulator test proves;
TensorFlow's GCS client has fixed endpoints and cannot be tested offline.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("EPATH_USE_TF", "false")  # Read by etils at the first gs:// access.

from etils import epath  # pylint: disable=g-import-not-at-top

from nin_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top

CONFIG_FILE = "config.json"
# Written when a run has trained all its steps: its step and final evaluation. Launchers
# (launch/tpu.sh babysit) poll for it; a longer run continuing the workdir removes it.
FINAL_FILE = "final.json"


def is_url(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path)


def resolve(workdir: str | os.PathLike) -> epath.Path:
  """`workdir` as an epath: URLs unchanged, local paths made absolute (Orbax needs that).

  `os.path.abspath` must never see a URL: it turns `gs://b/run` into `<cwd>/gs:/b/run`.
  """
  return epath.Path(workdir) if is_url(workdir) else epath.Path(os.path.abspath(workdir))


def prepare(workdir: str | os.PathLike) -> epath.Path:
  """Creates the workdir and proves it writable with a probe file, before any training."""
  path = resolve(workdir)
  try:
    if path.exists() and not path.is_dir():
      raise ConfigError(f"workdir {workdir} is a file; pass a directory to --workdir.")
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_test_{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ConfigError(f"workdir {workdir} cannot be written ({e.strerror or e}); choose a writable --workdir.") from e
  return path


def write_text(path: epath.Path, text: str) -> None:
  """Replaces a whole file so that a reader sees the old content or the new, never half.

  An object store replaces an object atomically when its upload completes (and a
  rename there is a slow copy); on a local disk we write a sibling and rename it.
  """
  if is_url(path):
    path.write_text(text)
    return
  tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
  tmp.write_text(text)
  os.replace(tmp, path)


def write_config(path: epath.Path, config_dict: dict) -> None:
  write_text(path / CONFIG_FILE, json.dumps(config_dict, indent=2, sort_keys=True) + "\n")


def write_final(path: epath.Path, step: int, metrics: dict) -> None:
  write_text(path / FINAL_FILE, json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")


def remove_final(path: epath.Path) -> None:
  (path / FINAL_FILE).unlink(missing_ok=True)
