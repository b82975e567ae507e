# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Class confidence maps (the paper's Figure 4)
#
# With a GAP head, the last mlpconv layer emits one map per class and a class's score is
# the mean of its map, so the maps can be read as *confidence maps*: the paper's Figure 4
# shows the map of the true class lighting up where the object is. This notebook draws
# those maps for trained models of the head ablation (`head_ablation.ipynb`; run it first with
# the same `workdir_root`): for a grid of test images, the input and the last layer's map for
# every class (after its ReLU) on one colour scale, the true class's map framed in green and a
# wrong prediction's in red. The same body trained with an FC head is drawn for contrast:
# nothing forces its maps to mean anything per class. A GAP run that failed (a class map dead
# on every image) is drawn too when the ablation has one, so the failure can be seen.
#
# ```bash
# papermill notebooks/class_maps.ipynb out.ipynb -k python3 -p workdir_root /tmp/nin_head_ablation
# ```

# %% tags=["parameters"]
workdir_root = "/tmp/nin_head_ablation"  # The head ablation's.
results = "notebooks/results"  # Its records, to find a failed GAP run.
setting = "full"  # Its setting: full or small.
seed = -1  # -1: the first seed whose GAP and FC runs of `setting` are in workdirs here.
train_failed = True  # Train a failed GAP run of the ablation again (~1 min) when none is here to draw.
num_images = 6  # Test images in the grid, one per class from class 0 on.

# %%
from pathlib import Path

import ml_collections
import numpy as np

from nin_jax import ablation, analysis


records = {r["name"]: r for r in ablation.records(Path(results))}


def here(name: str) -> bool:
  return name in records and ablation.trained_here(records[name], workdir_root)


def load(name: str):
  workdir = ablation.workdir_of(records[name], workdir_root)
  if not here(name):
    raise FileNotFoundError(f"{name}'s run is not in {workdir}: run notebooks/head_ablation.ipynb with this "
                            "workdir_root, or choose a seed whose runs are here.")
  config = ml_collections.ConfigDict(records[name]["config"])  # here(): the workdir ran this config.
  model, step = analysis.load_model(str(workdir), config)
  print(f"{name}: {workdir}, checkpoint at step {step}")
  return model, config


if seed < 0:
  seeds_here = sorted({r["seed"] for r in records.values() if r["setting"] == setting
                       and all(here(f"{setting}-{head}-{r['seed']}") for head in ("gap", "fc"))})
  if not seeds_here:
    raise FileNotFoundError(f"no seed of the {setting} setting has its GAP and FC runs under {workdir_root}: "
                            "run notebooks/head_ablation.ipynb with this workdir_root.")
  seed = seeds_here[0]
models, configs_ = {}, {}
for head in ("gap", "fc"):
  models[head], configs_[head] = load(f"{setting}-{head}-{seed}")

config = configs_["gap"]
test_x, test_y = analysis.dataset_images(config, "test", 2000)
picked = np.array([np.flatnonzero(test_y == c)[0] for c in range(num_images)])
images, labels = test_x[picked], test_y[picked]
names = analysis.class_names(config.dataset, models["gap"].spec.num_classes)

# %% [markdown]
# ## GAP: the maps are the classifier
#
# The logits must equal the spatial means of the drawn maps (checked here, not assumed).

# %%
maps, logits = analysis.class_maps(models["gap"], images)
print(f"maps of {len(images)} images: {maps.shape[1]}×{maps.shape[2]}×{maps.shape[3]} (height × width × classes)")
mismatch = float(np.abs(maps.mean(axis=(1, 2)) - logits).max())
print(f"largest |logit − mean of its map|: {mismatch:.2e}")
assert mismatch < 1e-4, "the GAP logits are not the means of the captured maps"
analysis.show(analysis.plot_class_maps(images, maps, labels, logits.argmax(-1), names,
                                    "GAP head: last mlpconv layer, one map per class"))

# %% [markdown]
# ## A failed GAP run
#
# A failed GAP run of the ablation, one whose class map died if there is one: that map is zero on
# every image, so its class's logit is 0 and it loses to any class with a positive score. When no
# failed run's workdir is here, the first is trained again from its record; on another CPU's
# bfloat16 kernels it may not fail alike, so its dead classes are measured again and shown beside
# the record's.

# %%
failed = sorted((r for r in records.values() if r["head"] == "gap" and r["failed"] and not r["diverged"]),
                key=lambda r: (not r["dead_classes"]["zero_maps"], not here(r["name"]), r["name"]))
if failed and not here(failed[0]["name"]) and train_failed:
  print(f"training {failed[0]['name']} again from its record: its workdir is not here")
  ablation.train_again(failed[0], workdir_root)
if failed and here(failed[0]["name"]):
  failed_model, failed_config = load(failed[0]["name"])
  failed_x, failed_y = analysis.dataset_images(failed_config, "test", 2000)
  all_failed_maps, all_failed_logits = analysis.class_maps(failed_model, failed_x)
  failed_maps, failed_logits = all_failed_maps[picked], all_failed_logits[picked]
  print(f"dead classes: {failed[0]['dead_classes']} in its record; "
        f"{analysis.dead_classes(all_failed_maps, all_failed_logits)} on these {len(failed_x):,} test images")
  analysis.show(analysis.plot_class_maps(failed_x[picked], failed_maps, failed_y[picked], failed_logits.argmax(-1),
                                         names, f"failed GAP run {failed[0]['name']}"))
else:
  print("no failed GAP run of the ablation is here to draw")

# %% [markdown]
# ## FC head, same body
#
# Here the classifier is a dense layer over all maps, so a map need not peak for its class.

# %%
fc_maps, fc_logits = analysis.class_maps(models["fc"], images)
analysis.show(analysis.plot_class_maps(images, fc_maps, labels, fc_logits.argmax(-1), names,
                                    "FC head: the same layer's maps"))

# %% [markdown]
# ## How often is the true class's map the strongest?
#
# Over 2,000 test images: how often the true class has the largest mean map (for GAP,
# that is its accuracy) and the largest peak value, for each head.

# %%
for head, model in models.items():
  all_maps, all_logits = analysis.class_maps(model, test_x)
  mean_hit = np.mean(all_maps.mean(axis=(1, 2)).argmax(-1) == test_y)
  peak_hit = np.mean(all_maps.max(axis=(1, 2)).argmax(-1) == test_y)
  accuracy = np.mean(all_logits.argmax(-1) == test_y)
  print(f"{head:>3}: true class has the largest mean map {100 * mean_hit:5.1f}%, the largest peak "
        f"{100 * peak_hit:5.1f}%; the head's accuracy {100 * accuracy:5.1f}%")
