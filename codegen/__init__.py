"""maskdsl.codegen: lowering patterns to a symbolic IR, generated mask_mod/score_mod source,
analytic BlockMasks and token tiling. Installed as ``maskdsl.codegen`` (never top-level)."""
