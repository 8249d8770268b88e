"""The seed README's import name: ``from LongNet import DilatedAttention`` keeps working."""

from longnet import *  # noqa: F403
from longnet import __all__  # noqa: F401
