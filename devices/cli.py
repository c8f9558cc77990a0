"""``edgesmith devices``, ``bundle`` and ``keygen``: targets and signed bundles (``ota`` is in
``edgesmith.devices.ota.cli``).

No torch: these commands run on devices. Heavy or optional imports (cryptography, paho-mqtt,
backends) happen inside the command that needs them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from edgesmith.devices.cliutil import echo_json, key_option
from edgesmith.errors import BundleError, CheckFailed, EdgesmithError, InputError
from edgesmith.text import printable

__all__ = ["bundle_group", "devices_group", "keygen_cmd"]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- devices


@click.group("devices")
def devices_group() -> None:
    """Target device profiles and hardware detection."""


@devices_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def devices_list(as_json: bool) -> None:
    """List the built-in device profiles."""
    from edgesmith.runtime.profiles import list_profiles, load_profile

    profiles = [load_profile(n) for n in list_profiles()]
    if as_json:
        echo_json([p.model_dump() for p in profiles])
        return
    click.echo(f"{'name':18} {'arch':8} {'backend':12} {'formats':22} {'precision':9} description")
    for p in profiles:
        click.echo(
            f"{p.name:18} {p.arch:8} {p.backend:12} {','.join(p.formats):22} {p.precision:9} {p.description}"
        )


@devices_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of YAML.")
def devices_show(name: str, as_json: bool) -> None:
    """Show every field of profile NAME (a built-in name or a YAML file)."""
    import yaml

    from edgesmith.runtime.profiles import load_profile

    data = load_profile(name).model_dump()
    if as_json:
        echo_json(data)
    else:
        click.echo(yaml.safe_dump(data, sort_keys=False).rstrip())


@devices_group.command("detect")
@click.option(
    "--root",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("/"),
    show_default=True,
    help="Read the device files below this folder (for tests and offline inspection).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def devices_detect(root: Path, as_json: bool) -> None:
    """Recognise this device (CPU, board, accelerators, backends) and name its profile."""
    from edgesmith.devices.detect import detect

    d = detect(root)
    if as_json:
        echo_json(d.to_json())
    else:
        click.echo(f"arch:         {d.arch or 'unknown'} ({d.cores} cores)")
        click.echo(f"cpu:          {d.cpu or 'unknown'}{f' ({d.vendor})' if d.vendor else ''}")
        if d.device_tree_model:
            click.echo(f"board:        {d.device_tree_model}")
        if d.jetson_release:
            click.echo(f"jetson linux: {d.jetson_release}")
        if d.accel_devices:
            click.echo(f"accelerators: {', '.join(d.accel_devices)}")
        if d.memory_mb:
            click.echo(f"memory:       {d.memory_mb} MB")
        for name, devs in d.backends.items():
            click.echo(f"{name + ':':13} {', '.join(devs)}")
        click.echo(
            f"profile:      {d.profile or 'none'}"
            + (f"  ({'; '.join(d.reasons)})" if d.reasons else "")
        )
        for note in d.notes:
            click.echo(f"note: {note}")
    if d.profile is None:
        raise EdgesmithError(
            "no device profile fits this machine",
            hint="write your own profile YAML and pass its path as --target",
        )


# --------------------------------------------------------------------------- keygen


@click.command("keygen")
@click.option(
    "-o",
    "--out",
    "prefix",
    type=click.Path(path_type=Path),
    required=True,
    help="Key pair prefix: writes PREFIX.key (private, mode 0600) and PREFIX.pub.",
)
@click.option("--force", is_flag=True, help="Replace an existing key pair.")
def keygen_cmd(prefix: Path, force: bool) -> None:
    """Create an Ed25519 signing key pair for bundles and channels.

    Keep PREFIX.key secret (never in a bundle or repository); install PREFIX.pub on devices.
    """
    from edgesmith.runtime.signing import generate_keypair

    if prefix.is_dir():
        raise InputError(
            f"-o {prefix} is a folder; -o takes a file prefix "
            f"(it would write {prefix}.key beside the folder)",
            hint=f"name the pair inside it: -o {prefix / 'release'}",
        )
    priv, pub, kid = generate_keypair(prefix, force=force)
    click.echo(f"private key: {priv} (mode 0600; keep it secret)")
    click.echo(f"public key:  {pub} (install on devices)")
    click.echo(f"key id:      {kid}")


# --------------------------------------------------------------------------- bundle


@click.group("bundle")
def bundle_group() -> None:
    """Create, inspect, verify and sign deploy bundles."""


@bundle_group.command("create")
@click.argument("model_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Bundle folder (or .tar) to write.",
)
@click.option("--name", required=True, help="Bundle name (letters, digits, . _ -).")
@click.option(
    "--version",
    "version",
    type=click.IntRange(min=1),
    required=True,
    help="Integer version, strictly increasing.",
)
@click.option("--target", required=True, help="Device profile the model is built for.")
@click.option(
    "--precision", default="fp32", show_default=True, help="Precision label (fp32, fp16, int8)."
)
@click.option(
    "--golden",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="A .npz with 'inputs' (and optionally 'outputs'): the health check.",
)
@click.option(
    "--atol", type=float, default=1e-4, show_default=True, help="Golden absolute tolerance."
)
@click.option(
    "--rtol", type=float, default=1e-3, show_default=True, help="Golden relative tolerance."
)
@click.option(
    "--labels",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Text file, one class label per line.",
)
@click.option("--expires", default=None, help="Bundle lifetime, e.g. 180d (default: no expiry).")
@click.option(
    "--sign-key",
    type=click.Path(path_type=Path),
    envvar="EDGESMITH_SIGN_KEY",
    help="Sign with this private key (NAME.key) [env EDGESMITH_SIGN_KEY].",
)
def bundle_create(
    model_file: Path,
    out: Path,
    name: str,
    version: int,
    target: str,
    precision: str,
    golden: Path | None,
    atol: float,
    rtol: float,
    labels: Path | None,
    expires: str | None,
    sign_key: Path | None,
) -> None:
    """Bundle MODEL_FILE (.onnx, .tflite, or OpenVINO .xml with its .bin) for deployment."""
    import tempfile

    import numpy as np

    from edgesmith.devices.ota.channel import iso_utc, parse_duration, utc_now
    from edgesmith.runtime import load
    from edgesmith.runtime.bundle import new_manifest, pack_bundle, write_bundle
    from edgesmith.runtime.bundle.files import model_references
    from edgesmith.runtime.formats import FORMATS, format_of_file
    from edgesmith.runtime.profiles import load_profile

    fmt = format_of_file(model_file)
    if fmt is None:
        raise BundleError(
            f"cannot tell the format of {model_file.name}",
            hint=f"give one of: {', '.join(f.suffix for f in FORMATS.values())}",
        )
    load_profile(target)  # an unknown target is an error with a suggestion
    model = load(model_file, device="cpu")  # screens the file (ONNX external data paths) first
    files = {model_file.name: model_file}
    # every file the model opens goes into the bundle, listed and hashed: ONNX external data
    # (wherever its locations point inside the model's folder), OpenVINO weights
    for rel in model_references(model_file.parent, model_file.name):
        side = model_file.parent / rel
        if not side.is_file():
            raise BundleError(
                f"{printable(model_file.name)} uses '{printable(rel)}', which is not in "
                f"{printable(model_file.parent)}",
                hint="put the model's external data (or .bin weights) next to it, as exported",
            )
        files[rel] = side
    manifest = new_manifest(
        name,
        version,
        target,
        fmt.name,
        precision,
        model_file.name,
        [s.to_json() for s in model.inputs],
        [s.to_json() for s in model.outputs],
        build={"tool": "bundle create"},
        expires=iso_utc(utc_now() + parse_duration(expires)) if expires else None,
        labels=[ln.strip() for ln in labels.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if labels
        else None,
    )
    with tempfile.TemporaryDirectory(prefix=".bundle-") as tmp:
        if golden:
            try:
                with np.load(golden, allow_pickle=False) as data:
                    inputs = np.asarray(data["inputs"])
                    outputs = np.asarray(data["outputs"]) if "outputs" in data else None
            except (KeyError, ValueError, OSError) as exc:
                raise BundleError(
                    f"cannot read golden file {golden}: {exc}",
                    hint="save it with np.savez(path, inputs=...)",
                ) from None
            if outputs is None:
                outputs = np.asarray(model(inputs))
            gpath = Path(tmp) / "golden.npz"
            np.savez(gpath, inputs=inputs, outputs=outputs)
            files["golden.npz"] = gpath
            manifest["golden"] = {
                "file": "golden.npz",
                "atol": atol,
                "rtol": rtol,
                "top1": outputs.ndim == 2,
            }
        if out.suffix == ".tar":
            folder = write_bundle(Path(tmp) / "bundle", manifest, files, sign_key=sign_key)
            pack_bundle(Path(tmp) / "bundle", out)
        else:
            folder = write_bundle(out, manifest, files, sign_key=sign_key)
    click.echo(
        f"wrote {out}: {folder.name} version {folder.version} for {target}"
        + (" (signed)" if sign_key else " (unsigned)")
    )


def _describe(check: Any, as_json: bool) -> None:
    m = check.manifest
    if as_json:  # JSON escapes control characters itself
        echo_json({"manifest": m.to_json(), "signed_by": check.signed_by, "signers": check.signers})
        return
    p = printable  # every string below comes from the bundle: escape control characters
    click.echo(f"{m.name} version {m.version}: {m.format} {p(m.precision)} for {p(m.target)}")
    click.echo(f"created {p(m.created)}" + (f", expires {p(m.expires)}" if m.expires else ""))
    for spec in m.inputs:
        click.echo(f"input  {p(spec['name'])}: {p(spec['dtype'])} {p(spec['shape'])}")
    for spec in m.outputs:
        click.echo(f"output {p(spec['name'])}: {p(spec['dtype'])} {p(spec['shape'])}")
    for rel, entry in sorted(m.files.items()):
        click.echo(f"file   {p(rel)}: {entry.size} bytes, sha256 {entry.sha256[:16]}…")
    if m.golden:
        click.echo(
            f"golden {p(m.golden.get('file'))} (atol {p(m.golden.get('atol'))}, "
            f"rtol {p(m.golden.get('rtol'))})"
        )
    if m.metrics:
        shown = {k: v for k, v in m.metrics.items() if isinstance(v, int | float | str)}
        click.echo("metrics " + ", ".join(f"{p(k)} {p(v)}" for k, v in shown.items()))
    if check.signed_by:
        click.echo(f"signature: verified, key {check.signed_by[:16]}")
    elif check.signers:
        click.echo(
            "signature: by key(s) "
            + ", ".join(p(s[:16]) for s in check.signers)
            + " (not checked: no --key)"
        )
    else:
        click.echo("signature: none (unsigned development bundle)")


@bundle_group.command("inspect")
@click.argument("bundle", type=click.Path(path_type=Path))
@key_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def bundle_inspect(bundle: Path, keys: tuple[Path, ...], as_json: bool) -> None:
    """Show a bundle's manifest and signature (files are not re-hashed; see `verify`)."""
    from edgesmith.runtime.bundle import verify_bundle

    _describe(verify_bundle(bundle, trusted_keys=list(keys) or None, check_files=False), as_json)


@bundle_group.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@key_option
@click.option(
    "--require-signature", is_flag=True, help="Fail on unsigned bundles (a device's policy)."
)
@click.option(
    "--target", default=None, help="Also check the bundle can run on this device profile."
)
def bundle_verify(
    bundle: Path, keys: tuple[Path, ...], require_signature: bool, target: str | None
) -> None:
    """Check sizes, SHA-256 hashes and (when present or required) the signature.

    A signed bundle needs --key to check its signature; an unsigned one passes with a warning
    unless --require-signature. Exit 0 when valid, 1 when the check fails, 2 on bad usage.
    """
    from edgesmith.runtime.bundle import verify_bundle

    try:
        check = verify_bundle(
            bundle, trusted_keys=list(keys) or None, require_signature=require_signature
        )
    except BundleError as exc:
        if not Path(bundle).exists():
            raise
        raise CheckFailed(exc.message, hint=exc.hint) from None
    m = check.manifest
    if check.signers and not check.signed_by:
        raise EdgesmithError(
            f"{bundle} is signed by key {printable(check.signers[0][:16])}, but no trusted public "
            "key was given",
            hint="pass the publisher's public key: --key NAME.pub",
        )
    if m.expired():
        raise CheckFailed(f"{bundle} expired at {m.expires}", hint="rebuild and republish it")
    if target:
        from edgesmith.runtime.profiles import load_profile

        prof = load_profile(target)
        if not prof.runs_bundles_for(m.target):
            raise CheckFailed(
                f"{bundle} is built for '{m.target}', which does not run on '{target}'",
                hint=f"build for the device: edgesmith build RECIPE --target {target}",
            )
    if check.signed_by:
        click.echo(
            f"ok: {m.name} version {m.version}: {len(m.files)} file(s) verified, signed by key {check.signed_by[:16]}"
        )
    else:
        click.echo(f"ok: {m.name} version {m.version}: {len(m.files)} file(s) verified")
        click.echo(
            "warning: unsigned development bundle; devices that require signatures refuse it",
            err=True,
        )


@bundle_group.command("sign")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True))
@click.option(
    "--key",
    type=click.Path(path_type=Path),
    required=True,
    envvar="EDGESMITH_SIGN_KEY",
    help="Private key file (NAME.key) [env EDGESMITH_SIGN_KEY].",
)
def bundle_sign(bundles: tuple[Path, ...], key: Path) -> None:
    """Sign BUNDLES (folders or .tar) in place; other signatures are kept (key rotation).

    \b
    After a build:  edgesmith bundle sign out/bundles/* --key keys/release.key
    """
    from edgesmith.runtime.bundle import sign_bundle
    from edgesmith.runtime.signing import load_private_key

    k = load_private_key(key)
    for bundle in bundles:
        kid = sign_bundle(bundle, k)
        click.echo(f"signed {bundle} with key {kid[:16]}")


@bundle_group.command("pack")
@click.argument("bundle", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option(
    "-o", "--out", type=click.Path(path_type=Path), required=True, help=".tar file to write."
)
def bundle_pack(bundle: Path, out: Path) -> None:
    """Verify a bundle folder and write it as one reproducible .tar file."""
    from edgesmith.runtime.bundle import pack_bundle

    pack_bundle(bundle, out)
    click.echo(f"wrote {out}")


@bundle_group.command("unpack")
@click.argument("bundle", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="New folder to extract into.",
)
@key_option
@click.option("--require-signature", is_flag=True, help="Refuse unsigned bundles.")
def bundle_unpack(bundle: Path, out: Path, keys: tuple[Path, ...], require_signature: bool) -> None:
    """Verify and safely extract a .tar bundle (no links, special files or paths outside OUT)."""
    from edgesmith.runtime.bundle import extract_bundle

    m = extract_bundle(
        bundle, out, trusted_keys=list(keys) or None, require_signature=require_signature
    )
    click.echo(f"extracted {m.name} version {m.version} to {out}")
