"""What keeps a run's state safe in its workdir, local or `gs://`: the files (`workdir`), the
one-writer lock (`lock`), checkpoints (`checkpointing`), metrics and summaries (`reporting`),
and the preemption signal (`preemption`).

Knows nothing of the model or the data: it imports only itself and `nin_jax.errors`.
"""
