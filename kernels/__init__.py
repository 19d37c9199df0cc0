"""maskdsl.kernels: the hand-written Triton kernel and the pure-PyTorch tiled kernel.
Installed as ``maskdsl.kernels`` (never top-level ``kernels``, a name taken on PyPI)."""
