"""maskdsl.codegen: lowering patterns to a symbolic IR, generated mask_mod/score_mod source,
analytic BlockMasks and token tiling. Installed as ``maskdsl.codegen`` (never top-level)."""

if __name__ != "maskdsl.codegen":   # imported as a top-level package (e.g. from the repository root)
    raise ImportError(
        f"{__name__!r} is maskdsl.codegen, which installs inside the maskdsl package; import "
        f"maskdsl.codegen instead (pip install -e . from the repository root makes it importable). "
        f"A top-level 'codegen' package would shadow the PyPI package of that name")
