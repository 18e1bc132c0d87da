"""Defaults that the command line needs before any heavy import (torch, transformers)."""

DEFAULT_MODEL = "smollm2-135m"
