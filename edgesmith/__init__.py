"""edgesmith: compress, export, verify, deploy and update PyTorch models on edge devices.

Importing this package is cheap: it pulls in neither torch nor any inference backend.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
