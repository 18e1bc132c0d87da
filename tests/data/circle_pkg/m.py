"""Imports a name from its own package, whose __init__ imports this module first."""

from . import X


def f():
    return X
