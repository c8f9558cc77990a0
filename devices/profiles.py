"""Device profiles (kept importable here): the profiles and their data files live in
:mod:`edgesmith.runtime.profiles`, below the runtime that reads them when it loads a bundle."""

from edgesmith.runtime.profiles import (
    Int8Scheme,
    Profile,
    Verified,
    list_profiles,
    load_profile,
    resolve_target,
)

__all__ = [
    "Int8Scheme",
    "Profile",
    "Verified",
    "list_profiles",
    "load_profile",
    "resolve_target",
]
