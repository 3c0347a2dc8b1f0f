"""Nexus: small Jamba-style hybrid (attention + Mamba) byte-level language models."""

from nexus.errors import NexusError

__version__ = "0.1.0"
__all__ = ["NexusError", "__version__"]
