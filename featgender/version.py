"""featgender's version, in a module of its own so that any module can record it without
importing the package's top (which imports them all)."""

__version__ = "0.1.0"
