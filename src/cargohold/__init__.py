"""cargohold: persistent, replicated block volumes for containers."""

__version__ = "0.1.0"
