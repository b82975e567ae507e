"""The notebooks: each .py/.ipynb pair holds the same cells, and both notebooks run top to
bottom through papermill at a tiny budget, as a user reruns them."""

import os

import jupytext
import nbformat
import papermill
import pytest

from tests.helpers import ROOT, needs_fmnist

NOTEBOOKS = os.path.join(ROOT, "notebooks")


def _cells(notebook) -> list[tuple[str, str, list]]:
  return [(c.cell_type, c.source.strip(), c.metadata.get("tags", [])) for c in notebook.cells]


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
  root = str(tmp_path / "runs")
  ablation = papermill.execute_notebook(
      os.path.join(NOTEBOOKS, "head_ablation.ipynb"), str(tmp_path / "head_ablation.ipynb"), kernel_name="python3",
      parameters=dict(seeds=[0], num_train_steps=30, train_examples=2048, eval_examples=500,
                      small_data_fraction=0.25, workdir_root=root), progress_bar=False, cwd=ROOT)
  ablation = nbformat.from_dict(ablation)
  tables = [t for t in _outputs(ablation, "text/markdown") if "| head |" in t]
  assert len(tables) == 2  # Full data and 25% of it.
  for table in tables:
    assert all(f"| `{head}` |" in table for head in ("gap", "fc", "fc_dropout"))
  assert "**full: 2,048 training images" in tables[0] and "**small: 512 training images" in tables[1]
  assert len(_outputs(ablation, "image/png")) == 2  # The learning curves of both settings.
  assert "6 runs in" in "".join(_outputs(ablation, "stream"))
  assert any("GAP's margin over FC" in t for t in _outputs(ablation, "text/markdown"))

  maps = nbformat.from_dict(papermill.execute_notebook(
      os.path.join(NOTEBOOKS, "class_maps.ipynb"), str(tmp_path / "class_maps.ipynb"), kernel_name="python3",
      parameters=dict(workdir_root=root), progress_bar=False, cwd=ROOT))
  printed = "".join(_outputs(maps, "stream"))
  assert "maps of 6 images: 7×7×10 (height × width × classes)" in printed
  assert "largest |logit − mean of its map|" in printed
  assert len(_outputs(maps, "image/png")) == 2  # GAP and FC grids.


def test_readme_shows_the_committed_runs_tables():
  """The README's Notebooks tables are the ones in the committed head_ablation outputs."""
  notebook = nbformat.read(os.path.join(NOTEBOOKS, "head_ablation.ipynb"), as_version=4)
  tables = [t.strip() for t in _outputs(notebook, "text/markdown") if "| head |" in t]
  assert tables, "notebooks/head_ablation.ipynb carries no outputs: run it (README, Notebooks)"
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  start, end = "<!-- head_ablation tables: begin -->", "<!-- head_ablation tables: end -->"
  assert start in readme and end in readme
  assert readme.split(start)[1].split(end)[0].strip() == "\n\n".join(tables), (
      "README's head-ablation tables differ from the notebook's: copy them from notebooks/head_ablation.ipynb")
