"""Target device profiles, hardware detection, deploy bundles and over-the-air updates.

Imports no torch: this package runs on the device.
"""

from edgesmith.devices.detect import Detection, detect
from edgesmith.runtime.profiles import Profile, list_profiles, load_profile, resolve_target

__all__ = ["Detection", "Profile", "detect", "list_profiles", "load_profile", "resolve_target"]
