"""scaletrain: train transformer language models from one process to a cluster."""

__version__ = "0.1.0"
