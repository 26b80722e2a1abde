"""The library's version (as pyproject.toml says), for what it writes: ``exported_by``."""

__version__ = "0.2.0"
