"""Deploy bundles (DESIGN.md section 4): a folder (or ``.tar`` of it) holding ``manifest.json``,
the model file(s) and ``manifest.sig``.

One module per concern: ``manifest`` (the schema, canonical bytes, path rules), ``files`` (the one
way to reach a listed file, hashing), ``signature`` (``manifest.sig`` over the raw bytes),
``tar`` (screened members, extraction), ``verify`` (``verify_bundle``/``read_bundle``) and
``write`` (``new_manifest``/``derived_manifest``, the one way to build a manifest's fields, and
``write_bundle``, ``pack_bundle``, ``sign_bundle``). Their public names are
re-exported here: ``from edgesmith.runtime.bundle import read_bundle``.
"""

from edgesmith.runtime.bundle.files import (
    check_model_references,
    fsync_dir,
    member_path,
    model_references,
    model_references_from,
    references_of,
    safe_member,
    sha256_file,
)
from edgesmith.runtime.bundle.manifest import (
    MANIFEST,
    SCHEMA,
    SIGNATURE,
    FileEntry,
    Manifest,
    canonical_bytes,
    check_rel,
    check_tree,
    parse_manifest,
    parse_utc,
)
from edgesmith.runtime.bundle.signature import KeySource
from edgesmith.runtime.bundle.tar import (
    DEFAULT_TAR_LIMITS,
    BundleCheck,
    TarLimits,
    extract_bundle,
    screen_tar_members,
)
from edgesmith.runtime.bundle.verify import read_bundle, verify_bundle
from edgesmith.runtime.bundle.write import (
    derived_manifest,
    new_manifest,
    pack_bundle,
    sign_bundle,
    write_bundle,
)

__all__ = [
    "DEFAULT_TAR_LIMITS",
    "MANIFEST",
    "SCHEMA",
    "SIGNATURE",
    "BundleCheck",
    "FileEntry",
    "KeySource",
    "Manifest",
    "TarLimits",
    "canonical_bytes",
    "check_model_references",
    "check_rel",
    "check_tree",
    "derived_manifest",
    "extract_bundle",
    "fsync_dir",
    "member_path",
    "model_references",
    "model_references_from",
    "new_manifest",
    "pack_bundle",
    "parse_manifest",
    "parse_utc",
    "read_bundle",
    "references_of",
    "safe_member",
    "screen_tar_members",
    "sha256_file",
    "sign_bundle",
    "verify_bundle",
    "write_bundle",
]
