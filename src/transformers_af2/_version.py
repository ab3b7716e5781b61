"""The package version, in a module of its own: `af2 --version` reads it without importing the package's dependencies."""

__version__ = "0.1.0"
