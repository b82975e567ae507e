"""benchmarks/: the PyTorch reference is the same network, and the comparison runs (skipped without torch)."""

import pytest

torch = pytest.importorskip("torch")

from benchmarks import compare, torch_nin  # noqa: E402  pylint: disable=g-import-not-at-top
from nin_jax.model import models  # noqa: E402

pytestmark = pytest.mark.slow  # PyTorch side by side.


@pytest.mark.parametrize("name", sorted(models.VARIANTS))
def test_the_torch_reference_has_the_jax_models_shapes_and_parameters(name):
  spec = models.get_spec(name)
  reference = torch_nin.build(name)
  jax_rows = models.summarize(models.create_model(name))
  assert sum(p.numel() for p in reference.parameters()) == sum(r.params for r in jax_rows)
  x = torch.zeros(2, spec.in_channels, spec.image_size, spec.image_size)
  shapes = []
  for layer in reference:
    x = layer(x)
    if isinstance(layer, (torch.nn.ReLU, torch.nn.MaxPool2d, torch.nn.AvgPool2d)):
      shapes.append((x.shape[2], x.shape[3], x.shape[1]))
  # Every layer and pool of the JAX model, in order (its table also lists dropout and the GAP).
  jax_shapes = [r.shape for r in jax_rows if not r.name.startswith(("drop", "gap"))]
  assert shapes == jax_shapes
  assert reference(torch.zeros(2, spec.in_channels, spec.image_size, spec.image_size)).shape == (2, spec.num_classes)


def test_compare_alternates_both_sides_and_reports_their_ratio():
  said = []
  rows = compare.compare([("nin_mnist", 16)], rounds=2, steps=1, repeats=1, say=said.append)
  assert [line.split(": ")[0] for line in said] == [
    "round 1/2 nin_mnist b16 project",
    "round 1/2 nin_mnist b16 torch",
    "round 2/2 nin_mnist b16 torch",
    "round 2/2 nin_mnist b16 project",
  ]
  (row,) = rows
  assert row["ratio"] == pytest.approx(row["project_images_per_sec"] / row["torch_images_per_sec"])
  assert row["project_images_per_sec"] > 0 and row["torch_images_per_sec"] > 0
  # Both sides' FLOP/s as a share of the one matmul peak: 6 FLOPs per multiply-add of a step.
  for side in ("project", "torch"):
    flops = 6 * 50_699_712 * row[f"{side}_images_per_sec"]
    assert row[f"{side}_fraction_of_peak"] == pytest.approx(flops / row["matmul_peak_flops_per_sec"])
  assert compare.markdown(rows).splitlines()[2].startswith("| `nin_mnist`, 16 | ")
