"""Target device profiles, hardware detection, deploy bundles and over-the-air updates.

Imports no torch: this package runs on the device.
"""

from edgesmith.devices.profiles import Profile, list_profiles, load_profile

__all__ = ["Profile", "list_profiles", "load_profile"]
