"""Builds and loads `native/onednn_conv.cc`, the oneDNN layers of nin_jax/model/onednn.py.

  python -m nin_jax.model.onednn_build      # what `bash setup.sh` runs: build now, say why not

The library is compiled with the system C++ compiler against the `onednn-cpu-gomp` wheels
of requirements.txt and jaxlib's FFI headers (~5 s), once per source, jaxlib, oneDNN
version and compiler command, into a cache directory of this user's:
`$NIN_JAX_CACHE_DIR`, else `$XDG_CACHE_HOME/nin_jax`, else `~/.cache/nin_jax`, else
`<tmp>/nin_jax-<uid>`. A shared library runs with the job's rights, so the directory is
made with mode 0700, and a directory or library that another user owns, or that others may
write, is refused, never loaded. A library that no longer loads (or was built against
another oneDNN) is rebuilt once. Set-up builds it, so a broken toolchain shows there with
the compiler's first `error:` line instead of as a slow first training run.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import secrets
import shutil
import site
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

CACHE_DIR = "NIN_JAX_CACHE_DIR"
SOURCE = Path(__file__).with_name("native") / "onednn_conv.cc"


class Unavailable(RuntimeError):
  """Why the oneDNN library cannot be built or loaded here."""


def supported_platform() -> str | None:
  """None on x86-64 Linux, the only place the oneDNN wheels exist; else why not."""
  machine = platform.machine()
  if sys.platform != "linux" or machine.lower() not in ("x86_64", "amd64"):
    return f"oneDNN wheels exist for x86-64 Linux only, not {sys.platform}/{machine or 'unknown'}"
  return None


def onednn_prefix() -> Path:
  """The install prefix whose include/ and lib/ hold the oneDNN wheels' files."""
  for prefix in (sys.prefix, site.getuserbase()):
    files = (Path(prefix) / "include/oneapi/dnnl/dnnl.hpp", Path(prefix) / "lib/libdnnl.so")
    if all(f.exists() for f in files):
      return Path(prefix)
  raise Unavailable("oneDNN is not installed (pip install -r requirements.txt brings it on x86-64 Linux)")


def onednn_version(prefix: Path) -> int:
  """The installed oneDNN's version as major * 10000 + minor * 100 + patch, from its header."""
  header = (prefix / "include/oneapi/dnnl/dnnl_version.h").read_text()
  parts = [
    int(re.search(rf"#define DNNL_VERSION_{part}\s+(\d+)", header).group(1)) for part in ("MAJOR", "MINOR", "PATCH")
  ]
  return parts[0] * 10000 + parts[1] * 100 + parts[2]


def _home_cache() -> Path | None:
  if os.environ.get("XDG_CACHE_HOME"):
    return Path(os.environ["XDG_CACHE_HOME"]) / "nin_jax"
  try:
    return Path.home() / ".cache" / "nin_jax"
  except (RuntimeError, KeyError):  # No HOME and no passwd entry.
    return None


def check_private(path: Path, what: str) -> None:
  """Refuses `path` unless this user owns it and nobody else may write it."""
  info = path.stat()
  if info.st_uid != os.geteuid():
    raise Unavailable(
      f"refusing {what} {path}: it belongs to uid {info.st_uid}, not to this user "
      f"({os.geteuid()}); remove it or set {CACHE_DIR} to a directory of yours"
    )
  if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
    raise Unavailable(
      f"refusing {what} {path}: others may write it (mode {stat.filemode(info.st_mode)}); "
      f"chmod go-w it or set {CACHE_DIR}"
    )


def cache_dir() -> Path:
  """This user's cache directory, created private (0700) and checked before use."""
  configured = os.environ.get(CACHE_DIR)
  if configured:
    candidates = [Path(configured)]
  else:  # No shared fallback: the temporary one is this user's own, checked like the others.
    candidates = [p for p in (_home_cache(), Path(tempfile.gettempdir()) / f"nin_jax-{os.geteuid()}") if p]
  for directory in candidates:
    try:
      directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
      continue
    check_private(directory, "the cache directory")
    return directory
  raise Unavailable(f"no writable cache directory (tried {', '.join(map(str, candidates))}); set {CACHE_DIR}")


def compile_error(stderr: str) -> str:
  """The line a compiler failure is about: its first `error:` line, else its last line."""
  lines = [line.strip() for line in stderr.splitlines() if line.strip()]
  return next((line for line in lines if "error:" in line), lines[-1] if lines else "no output")


def _compiler() -> str:
  wanted = os.environ.get("CXX")
  compiler = shutil.which(wanted) if wanted else shutil.which("c++") or shutil.which("g++")
  if compiler is None:
    raise Unavailable(f"C++ compiler {wanted!r} not found" if wanted else "no C++ compiler (install g++ or set CXX)")
  return compiler


def library_path() -> tuple[Path, list[str], int]:
  """Where this source, jaxlib, oneDNN and compiler's library lives; its build command; oneDNN's version."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top

  prefix = onednn_prefix()
  version = onednn_version(prefix)
  recipe = [
    _compiler(),
    "-O2",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-fopenmp",
    "-w",
    f"-I{jax.ffi.include_dir()}",
    f"-I{prefix / 'include'}",
    str(SOURCE),
    f"-L{prefix / 'lib'}",
    "-ldnnl",
    f"-Wl,-rpath,{prefix / 'lib'}",
  ]
  key = " ".join([jaxlib.__version__, f"onednn {version}", *recipe]).encode()
  digest = hashlib.sha256(SOURCE.read_bytes() + key).hexdigest()[:16]
  return cache_dir() / f"onednn_conv-{digest}.so", recipe, version


def _compile(recipe: list[str], library: Path) -> None:
  """Compiles into a file unique to this host and process, then renames it into place
  (atomic), so processes that start together never load a half-written library."""
  partial = library.with_name(f"{library.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.partial")
  try:
    done = subprocess.run([*recipe, "-o", str(partial)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
      raise Unavailable(f"compiling {SOURCE.name} failed: {compile_error(done.stderr)}")
    partial.chmod(0o700)
    os.replace(partial, library)
  finally:
    partial.unlink(missing_ok=True)


def _open(library: Path, version: int) -> ctypes.CDLL:
  check_private(library, "the library")
  loaded = ctypes.CDLL(str(library))
  if loaded.NinOneDnnVersion() != version:
    raise OSError(f"built against oneDNN {loaded.NinOneDnnVersion()}, {version} installed")
  return loaded


def load() -> ctypes.CDLL:
  """The compiled library, loaded; built first if missing, rebuilt once if it does not load."""
  reason = supported_platform()
  if reason:
    raise Unavailable(reason)
  library, recipe, version = library_path()
  if not library.exists():
    _compile(recipe, library)
  try:
    return _open(library, version)
  except OSError:  # A stale or damaged build (another oneDNN, a truncated file): build it anew.
    library.unlink(missing_ok=True)
    _compile(recipe, library)
    try:
      return _open(library, version)
    except OSError as error:
      raise Unavailable(f"{library.name} was rebuilt but does not load: {error}") from error


def expected_here() -> bool:
  """Whether the layers must build here: x86-64 Linux with the oneDNN wheels installed."""
  if supported_platform():
    return False
  try:
    onednn_prefix()
  except Unavailable:
    return False
  return True


def main() -> int:
  try:
    loaded = load()
  except Unavailable as error:
    print(f"oneDNN layers: {error}", file=sys.stderr)
    if expected_here():
      print(
        "oneDNN layers: not built; training would use XLA's kernels (slower on CPU). Fix the line "
        "above and run `python -m nin_jax.model.onednn_build` again.",
        file=sys.stderr,
      )
      return 1
    print("oneDNN layers: not for this platform; training uses XLA's kernels.", file=sys.stderr)
    return 0
  print(f"oneDNN layers: built and loaded {loaded._name}")  # pylint: disable=protected-access
  return 0


if __name__ == "__main__":
  sys.exit(main())
