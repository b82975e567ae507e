"""The notebooks: each .py/.ipynb pair holds the same cells, and both notebooks run top to
bottom through papermill at a tiny budget, as a user reruns them."""

import json
import os

import jupytext
import nbformat
import papermill
import pytest

from nin_jax import analysis
from nin_jax.run import lock
from nin_jax.run import workdir as workdir_lib
from tests.helpers import ROOT, needs_fmnist

pytestmark = pytest.mark.slow  # Notebooks executed by papermill.

NOTEBOOKS = os.path.join(ROOT, "notebooks")


def _cells(notebook) -> list[tuple[str, str, list]]:
  """The cells a pair shares. papermill's injected-parameters cell is left out: it records how
  the committed run was called (e.g. its workdir_root), so only the .ipynb carries it."""
  return [
    (c.cell_type, c.source.strip(), c.metadata.get("tags", []))
    for c in notebook.cells
    if "injected-parameters" not in c.metadata.get("tags", [])
  ]


@pytest.mark.parametrize("name", ["head_ablation", "class_maps"])
def test_each_paired_py_and_ipynb_hold_the_same_cells(name):
  script = jupytext.read(os.path.join(NOTEBOOKS, f"{name}.py"))
  notebook = jupytext.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"))
  assert _cells(script) == _cells(notebook), f"run: jupytext --sync notebooks/{name}.py"
  assert any("parameters" in c.metadata.get("tags", []) for c in notebook.cells)


def _outputs(notebook, kind: str) -> list[str]:
  """Every output of a mime type (e.g. text/markdown, image/png) or every stream text."""
  found = []
  for cell in notebook.cells:
    for output in cell.get("outputs", []):
      if kind == "stream" and output.output_type == "stream":
        found.append(output.text)
      elif kind in output.get("data", {}):
        found.append(output.data[kind])
  return found


@needs_fmnist
def test_both_notebooks_run_at_a_tiny_budget(tmp_path, monkeypatch):
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("XLA_FLAGS", "")  # One device, as a notebook user has.
  root, results = str(tmp_path / "runs"), tmp_path / "results"

  parameters = dict(
    heads=["gap", "fc"],
    seeds=[0],
    validation_examples=500,
    train_examples=2048,
    small_train_examples=512,
    epochs={"full": 0.25, "small": 0.5},
    grid_epochs=0.25,
    learning_rates=[3e-3],
    long_factor=0,
    failure_seeds=[0],
    failure_steps=4,
    init_seeds=2,
    test_examples=500,
    results=str(results),
    workdir_root=root,
  )

  def run_ablation():
    return nbformat.from_dict(
      papermill.execute_notebook(
        os.path.join(NOTEBOOKS, "head_ablation.ipynb"),
        str(tmp_path / "head_ablation.ipynb"),
        kernel_name="python3",
        parameters=parameters,
        progress_bar=False,
        cwd=ROOT,
      )
    )

  # Another process trains FC's grid run: this one trains GAP's runs, leaves FC's to it, and says so.
  held = tmp_path / "runs" / "grid-0.003-fc-0"
  held.mkdir(parents=True)
  with lock.WorkdirLock(workdir_lib.resolve(held)):
    shared = run_ablation()
  printed = "".join(_outputs(shared, "stream"))
  assert (
    "fc: part of its grid trains in another process" in printed and "chosen learning rates: {'gap': 0.003}" in printed
  )
  assert "2 runs still to train: full-fc-0, small-fc-0" in printed
  assert any(t.startswith("**Provisional**: 2 runs") for t in _outputs(shared, "text/markdown"))

  ablation = run_ablation()  # Once the lock is gone, FC's runs train here.
  printed = "".join(_outputs(ablation, "stream"))
  # The failure study's 2 runs, the grid's 2 (filed again as seed 0's full runs), the small setting's 2;
  # the long runs are left out here (tests/test_ablation.py checks their tables).
  assert (
    "8 records;" in printed
    and "0 runs still to train" in printed
    and "chosen learning rates: {'gap': 0.003, 'fc': 0.003}" in printed
  )
  assert sorted(p.name for p in (results / "runs").glob("*.json"))[:3] == [
    "failure-old-gap-0.json",
    "failure-old-mult-gap-0.json",
    "full-fc-0.json",
  ]
  assert len(json.loads((results / "head_ablation.json").read_text())) == 8
  tables = [t for t in _outputs(ablation, "text/markdown") if t.startswith("**") and "| head | runs (failed) |" in t]
  assert len(tables) == 2 and "**full: 2,048 training images, 1 seeds**" in tables[0]
  assert "**small: 512 training images, 1 seeds**" in tables[1]
  for table in tables:
    assert "| `gap` | 1 (" in table and "| `fc` | 1 (" in table and "| `gap` − `fc` |" in table
  assert len(_outputs(ablation, "image/png")) == 2  # The validation curves of both settings.
  (said,) = [t for t in _outputs(ablation, "text/markdown") if "| setting | head |" in t]
  assert "runs failed and are left out" in said and "| full (2,048 images, 0.25 epochs) | `gap` | 1 (" in said

  maps = nbformat.from_dict(
    papermill.execute_notebook(
      os.path.join(NOTEBOOKS, "class_maps.ipynb"),
      str(tmp_path / "class_maps.ipynb"),
      kernel_name="python3",
      parameters=dict(workdir_root=root, results=str(results)),
      progress_bar=False,
      cwd=ROOT,
    )
  )
  printed = "".join(_outputs(maps, "stream"))
  assert "maps of 6 images: 7×7×10 (height × width × classes)" in printed
  assert "largest |logit − mean of its map|" in printed
  drawn_failed = "dead classes:" in printed
  assert drawn_failed or "no failed GAP run of the ablation is here to draw" in printed
  assert len(_outputs(maps, "image/png")) == 2 + drawn_failed  # GAP and FC grids, and a failed run's.


def test_readme_shows_the_committed_runs_results():
  """The README's Notebooks results are the committed head_ablation notebook's last output;
  while the ablation is still running (a notebook without outputs), the README shows none."""
  results = analysis.ablation_results(os.path.join(NOTEBOOKS, "head_ablation.ipynb"))
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  start, end = analysis.README_RESULTS
  assert start in readme and end in readme
  shown = readme.split(start)[1].split(end)[0].strip()
  if not results:
    assert "| head |" not in shown and "not yet" in shown, "README shows results the notebook does not hold"
    return
  assert [shown] == results, (
    "README's head-ablation results differ from the notebook's: "
    "python -m nin_jax.analysis readme notebooks/head_ablation.ipynb README.md"
  )
