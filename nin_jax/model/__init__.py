"""The network: NIN's layers and variants (`layers`, `models`) and the CPU's oneDNN kernels
(`onednn`, built by `onednn_build` from `native/`, checked per dtype by `dtype_probe`).

Knows nothing of data sets, workdirs or training: it imports only itself and `nin_jax.errors`
(tests/test_imports.py holds every subpackage to that rule).
"""
