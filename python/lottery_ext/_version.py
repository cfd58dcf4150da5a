"""The package version (its own module: the run directory and tickets record it)."""

__version__ = "0.1.0"
