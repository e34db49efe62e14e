"""edgeatp: find the circuits inside transformer language models."""

__version__ = "0.1.0"
