"""Asyncio emulation testbed for collaborative diffusion across mobile edge networks."""

from testbed.errors import TestbedError

__all__ = ["TestbedError", "__version__"]
__version__ = "0.1.0"
