"""The project's version, written into every log header."""
__version__ = "0.1.0"
