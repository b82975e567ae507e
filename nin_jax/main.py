"""Command line: `python -m nin_jax.main --config experiments/X.py --workdir DIR`.

Thin on purpose: flags in, `train.train_and_evaluate` out. Anything the user can
fix ends as one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from nin_jax import host_memory

_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"

_CONFIG = config_flags.DEFINE_config_file("config", None, "An experiments/*.py config file.")
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Directory or URL (e.g. gs://bucket/run) for checkpoints, metrics and logs."
)
_FAST_CPU_FUSIONS = flags.DEFINE_bool(
  "fast_cpu_fusions",
  True,
  f"On CPU, let XLA run dots and reductions through YNNPACK ({_YNN_FLAG}): ~1.25x faster "
  "NIN training here, float32 results within ~1e-5 (relative) of the plain path. Ignored on GPU/TPU.",
)
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  False,
  "Call jax.distributed.initialize() (auto-detects TPU pods, Slurm, Open MPI <= 4; Open MPI 5 "
  "needs --coordinator_address).",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for manual multi-host.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes, for manual multi-host.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, for manual multi-host.")


def use_fast_cpu_fusions() -> None:
  """Lets XLA:CPU run dots and reductions through YNNPACK; GPU and TPU ignore the flag.

  Measured on the 2-core CPU (nin_mnist b64 train step, two runs each): no flag 177.5 and
  177.3 ms, `dot` 175.9 and 182.8 ms, `dot,reduce` 137.3 and 145.5 ms. The reductions that
  matter are the bias gradients, which XLA otherwise splits into slow reduce-windows.
  Tried and left out (within noise, or slower): `eltwise`, --xla_cpu_use_onednn (its
  convolutions never engaged), oneDNN/XNN fusion types, XNN graph fusion, vector width
  512, fast math, the FAST_RUNTIME preset, tiling propagation. XLA reads its flags when JAX starts:
  call this before importing JAX. A YNN choice already in XLA_FLAGS is kept.
  """
  if "ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_YNN_FLAG}".strip()


def _process_group(env) -> tuple[str | None, int | None, int | None]:
  """(coordinator, process count, process id) for jax.distributed.initialize: the flags, else
  what JAX detects (TPU pods, Slurm, Open MPI up to 4). Open MPI 5 launches through PRRTE and
  no longer sets OMPI_MCA_orte_hnp_uri, which JAX's detection reads: there the count and id
  come from its OMPI_COMM_WORLD_* variables and the coordinator from --coordinator_address."""
  count, rank = _NUM_PROCESSES.value, _PROCESS_ID.value
  if "OMPI_COMM_WORLD_SIZE" in env and "OMPI_MCA_orte_hnp_uri" not in env:
    if not _COORDINATOR.value:
      _fail(
        "Open MPI 5 gives JAX no coordinator address: add --coordinator_address=HOST:PORT "
        "(the first process's host and a free port)."
      )
    count = count if count is not None else int(env["OMPI_COMM_WORLD_SIZE"])
    rank = rank if rank is not None else int(env["OMPI_COMM_WORLD_RANK"])
  return _COORDINATOR.value, count, rank


def _fail(message: str, code: int = 2) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; settings go in --config.KEY=VALUE.")
  if _CONFIG.value is None:
    _fail("give a config file: --config experiments/nin_fashion_mnist.py")
  if not _WORKDIR.value:
    _fail("give an output directory: --workdir DIR")
  if _FAST_CPU_FUSIONS.value:
    use_fast_cpu_fusions()
  host_memory.keep_for(_CONFIG.value)  # Before JAX starts its threads.
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.

  import jax  # pylint: disable=g-import-not-at-top

  from nin_jax import errors, train  # pylint: disable=g-import-not-at-top

  if _COORDINATOR.value or _DISTRIBUTED.value:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # Only used on CPU.
    jax.distributed.initialize(*_process_group(os.environ))
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except errors.SaveFailed as e:
    _fail_now(str(e), e.exit_code)
  except errors.UserError as e:
    _fail(str(e), e.exit_code)


def _fail_now(message: str, code: int) -> None:
  """After a failed save, Orbax leaves non-daemon threads that wait ~300 s for peers at
  exit (their log output stays held by `checkpointing.save`). The run has flushed its
  logs and kept its checkpoints: say why, and leave at once."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(code)  # pylint: disable=protected-access


def run() -> None:
  """Parses flags and loads the config first, so that a typo is one line, not a traceback."""
  try:
    argv = flags.FLAGS(sys.argv)
    if _CONFIG.value is not None:  # A file that failed to load raises on first use.
      _CONFIG.value.to_dict()
  except Exception as e:  # pylint: disable=broad-except
    cause = e.__cause__ or e
    text = str(cause).replace("\\n", "\n").replace("\\'", "'")
    if "Traceback (most recent call last)" in text:  # A config file's get_config() raised:
      text = text.strip().splitlines()[-1]  # its own exception line is what the user needs.
    _fail(f"bad flags or config ({type(cause).__name__}): {' '.join(text.split())}")
  main(argv)


if __name__ == "__main__":
  run()
