"""maskdsl.kernels: the hand-written Triton kernel and the pure-PyTorch tiled kernel.
Installed as ``maskdsl.kernels`` (never top-level ``kernels``, a name taken on PyPI)."""

if __name__ != "maskdsl.kernels":   # imported as a top-level package (e.g. from the repository root)
    raise ImportError(
        f"{__name__!r} is maskdsl.kernels, which installs inside the maskdsl package; import "
        f"maskdsl.kernels instead (pip install -e . from the repository root makes it importable). "
        f"A top-level 'kernels' package would shadow the PyPI package of that name")
