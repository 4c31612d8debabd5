"""MEEstral: early exits for Transformer and state-space LLMs."""

from meestral.errors import MeestralError

__version__ = "0.1.0"
__all__ = ["MeestralError", "__version__"]
