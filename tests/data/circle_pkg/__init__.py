"""A package whose module takes a name from it while it imports that module (tests/test_structure.py)."""

from .m import f

__all__ = ["X", "f"]
X = 1
