"""ouvert's version, in a room of its own so that anything may read it without importing the package."""

__version__ = "0.1.0"
