"""A job: everything a run is made of, derived from its config before the first step.

Validation, the workdir (refusing another run's), the model, this host's data, the
step counts and the device mesh. Building one reads the data but trains nothing, so
tests and notebooks can inspect exactly what a run would use.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nin_jax import configs, durations, lineage
from nin_jax.data import batches, input_pipeline
from nin_jax.model import models
from nin_jax.run import workdir as workdir_lib


@dataclasses.dataclass
class Job:
  """Everything a run is made of, derived from the config before the first step."""

  config: ml_collections.ConfigDict
  workdir: workdir_lib.epath.Path
  devices: list
  model: models.ModelConfig
  data: batches.Data
  num_steps: int
  steps_per_epoch: int
  eval_every: int
  mesh: Mesh
  config_changes: dict | None  # Since the workdir's last segment; None for a new workdir.

  @property
  def top5(self) -> bool:
    return self.model.spec.num_classes >= 100

  def put(self, local: np.ndarray) -> jax.Array:
    """This host's rows of a global batch, as one array sharded over the `data` axis."""
    global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    return jax.make_array_from_process_local_data(NamedSharding(self.mesh, P("data")), local, global_shape)


def make_job(config: ml_collections.ConfigDict, workdir, devices: list | None) -> Job:
  config = ml_collections.ConfigDict(config.to_dict())
  devices = list(devices) if devices is not None else jax.devices()
  configs.validate(config, len(devices), jax.process_count())
  # Eval batches are padded and masked anyway, so any size can round up to fit the mesh.
  config.eval_batch_size = -(-config.eval_batch_size // len(devices)) * len(devices)
  path = workdir_lib.resolve(workdir)  # Prepared (created, probed) by the caller, before locking it.
  config_changes = lineage.changes(path, config)  # Refuses another run's workdir, writing nothing.
  model = configs.model_config(config)
  data = input_pipeline.make_data(
    config,
    image_size=model.image_size,
    in_channels=model.spec.in_channels,
    num_classes=model.spec.num_classes,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  steps_per_epoch = max(data.num_train_examples // config.batch_size, 1)
  num_steps = durations.steps(config, "train", steps_per_epoch)
  eval_every = {0: steps_per_epoch}.get(config.eval_every_steps, config.eval_every_steps)
  return Job(
    config,
    path,
    devices,
    model,
    data,
    num_steps,
    steps_per_epoch,
    eval_every=eval_every if eval_every > 0 else num_steps,  # < 0: only at the end.
    mesh=Mesh(np.array(devices), ("data",)),
    config_changes=config_changes,
  )
