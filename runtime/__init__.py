"""What a device app embeds: ``load()`` a bundle or model file and call it with numpy arrays.

Imports numpy, the standard library and only the backend actually used: never torch.
"""

from edgesmith.errors import BundleError, InputError, ModelLoadError
from edgesmith.runtime.bundle import Manifest, read_bundle
from edgesmith.runtime.model import Model, load
from edgesmith.runtime.specs import TensorSpec

__all__ = [
    "BundleError",
    "InputError",
    "Manifest",
    "Model",
    "ModelLoadError",
    "TensorSpec",
    "load",
    "read_bundle",
]
