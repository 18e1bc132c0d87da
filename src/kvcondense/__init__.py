"""kvcondense."""
