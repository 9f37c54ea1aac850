"""The package version, in a leaf module: the JIT engine keys its cache on it without importing the API layer."""

__version__ = "0.1.0"
