"""raylm: the whole life of a language model on one Ray cluster."""

__version__ = "0.1.0"
