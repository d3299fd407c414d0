"""An async inference gateway that makes a fleet of Triton servers look like one."""

__version__ = "0.1.0"
