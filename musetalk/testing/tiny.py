"""Moved to :mod:`musetalk.stages.tiny` (the demo and the notebooks use it, so it lives in the product)."""

from musetalk.stages.tiny import *  # noqa: F401,F403
from musetalk.stages.tiny import is_tiny, write_tiny_models  # noqa: F401
