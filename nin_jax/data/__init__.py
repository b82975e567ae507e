"""The data: the in-memory sets (`datasets`) and their pipeline (`input_pipeline`), ImageNet's
streaming pipeline (`imagenet`) and its one-time preparation (`imagenet_prepare`), and the
batch a training step receives (`batches`).

Knows nothing of the model or of workdirs: it imports only itself and `nin_jax.errors`.
"""
