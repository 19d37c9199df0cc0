"""The one error type maskdsl raises for bad specs and bad inputs."""

__all__ = ["MaskDSLError"]


class MaskDSLError(ValueError):
    """A malformed pattern, score or input.

    Every message names the field, the value it got and the legal range, e.g.
    ``neighborhood: kernel_size[1]=9 with dilation 2 needs shape[1] >= 18, got 16``.
    It subclasses ``ValueError`` so generic handlers keep working.
    """
