"""Every command in the README and docs/ runs as written, as far as that is cheap to show.

Each fenced `bash` command is read as a shell would read it, and checked for what can go
stale: the module of `python -m` exists, a config file and every `--config.KEY` it is given
exist, a script or notebook it names exists, and `launch/tpu.sh` accepts the command in its
dry run (which prints every gcloud command and runs none); an `export NAME=$(python -m
MODULE)` runs the module, which must print one line. Commands that need the network
or the cloud (`pip`, `gcloud`) are only parsed. The long runs themselves are exercised by
the tests that train, launch and run the notebooks.
"""

import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

from nin_jax import configs
from nin_jax.model import models
from tests.helpers import ROOT

DOCS = ["README.md", *sorted(f"docs/{name}" for name in os.listdir(os.path.join(ROOT, "docs")))]


def _commands(path: str) -> list[list[str]]:
  with open(os.path.join(ROOT, path), encoding="utf-8") as f:
    text = f.read()
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      for command in line.split("&&"):
        words = shlex.split(command, comments=True)
        if words:
          commands.append(words)
  return commands


ALL = [(path, words) for path in DOCS for words in _commands(path)]


def _check_trainer_arguments(words: list[str]) -> None:
  """`--config FILE[:VARIANT]` exists and every `--config.KEY=VALUE` names a config key."""
  config_file = words[words.index("--config") + 1].split(":")[0]
  assert os.path.exists(os.path.join(ROOT, config_file)), config_file
  keys = set(configs.default_config().keys())
  for word in words:
    if word.startswith("--config."):
      assert word[len("--config.") :].split("=")[0].split(".")[0] in keys, word


@pytest.mark.parametrize("path,words", ALL, ids=[f"{p}:{' '.join(w)[:60]}" for p, w in ALL])
def test_documented_command_runs_as_written(path, words):
  if words[0] == "taskset":  # `taskset -c CPUS COMMAND...`: pinned to cores, the command checked as usual.
    assert words[1] == "-c", words
    words = words[3:]
  if words[0] == "export":  # `export NAME=$(python -m MODULE)`: the module runs and prints a value.
    name, command = " ".join(words[1:]).split("=", 1)
    module = re.fullmatch(r"\$\(python -m ([\w.]+)\)", command)
    assert name.isidentifier() and module, f"{path}: {' '.join(words)}"
    printed = subprocess.run(
      [sys.executable, "-m", module.group(1)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert printed.stdout.strip() and "\n" not in printed.stdout.strip(), printed.stdout
    return
  program = words[0]
  if program in ("pip", "gcloud", "ruff"):
    return  # Network, cloud or a tool of the set-up: parsed only.
  if program == "python":
    assert words[1] == "-m", words
    assert importlib.util.find_spec(words[2]) is not None, f"{path}: no module {words[2]}"
    if words[2] == "nin_jax.main":
      _check_trainer_arguments(words)
  elif program == "papermill":
    assert os.path.exists(os.path.join(ROOT, words[1])), words[1]
  elif program == "bash":
    assert os.path.exists(os.path.join(ROOT, words[1])), words[1]
    if "--config" in words:
      _check_trainer_arguments(words)
    if words[1] == "launch/tpu.sh":
      proc = subprocess.run(
        ["bash", *words[1:]],
        cwd=ROOT,
        env={**os.environ, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
      )
      assert proc.returncode == 0, f"{path}: {' '.join(words)}\n{proc.stderr[-2000:]}"
  else:
    pytest.fail(f"{path}: a documented command this test does not know how to check: {' '.join(words)}")


def test_the_per_layer_table_in_docs_is_what_the_command_prints(capsys):
  with open(os.path.join(ROOT, "docs", "models.md"), encoding="utf-8") as f:
    block = re.search(r"```console\n\$ python -m nin_jax.model.models nin_imagenet[^\n]*\n(.*?)```", f.read(), re.S)
  assert block, "docs/models.md lacks the per-layer table of nin_imagenet"
  models.main(["nin_imagenet"])
  assert capsys.readouterr().out.strip() == block.group(1).strip()


def test_the_readme_is_a_front_door():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  assert len(readme.splitlines()) <= 200
  for link in re.findall(r"\]\((docs/[\w.]+)", readme):
    assert os.path.exists(os.path.join(ROOT, link)), link
