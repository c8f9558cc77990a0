"""The ``edgesmith`` command line.

Commands are registered by name in ``COMMANDS`` and imported only when invoked, so that
``edgesmith serve`` on a device never imports torch. Only this module turns errors into exit
codes: 0 success, 1 a check failed, 2 bad input or usage.
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import socket
import sys
from pathlib import Path
from typing import Any

import click

from edgesmith import __version__
from edgesmith.errors import EdgesmithError
from edgesmith.progress import echo, set_quiet
from edgesmith.text import printable

__all__ = ["COMMANDS", "cli", "describe_os_error", "main"]

# command name -> "module:attribute" of a click command; each package adds its own.
COMMANDS: dict[str, str] = {
    "build": "edgesmith.cli:build_cmd",
    "recipe": "edgesmith.cli:recipe_group",
    "export": "edgesmith.cli:export_cmd",
    "run": "edgesmith.runtime.cli:run_cmd",
    "bench": "edgesmith.runtime.cli:bench_cmd",
    "devices": "edgesmith.devices.cli:devices_group",
    "bundle": "edgesmith.devices.cli:bundle_group",
    "keygen": "edgesmith.devices.cli:keygen_cmd",
    "ota": "edgesmith.devices.ota.cli:ota_group",
    "serve": "edgesmith.runtime.cli:serve_cmd",
    "finetune": "edgesmith.devices.finetune_cli:finetune_cmd",
    "prune": "edgesmith.commands.prune:prune_cmd",
    "distill": "edgesmith.commands.distill:distill_cmd",
    "quantize": "edgesmith.commands.quantize:quantize_cmd",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        name = args[0] if args else ""
        if name and not name.startswith("-") and name not in COMMANDS:
            import difflib

            close = difflib.get_close_matches(name, COMMANDS, n=1)
            raise click.UsageError(
                f"unknown command '{name}'" + (f"; did you mean '{close[0]}'?" if close else ""),
                ctx,
            )
        return super().resolve_command(ctx, args)


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="edgesmith")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug logs).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and results; no progress bars.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool, debug: bool) -> None:
    """Compress, export, verify and deploy PyTorch models to edge devices.

    \b
    Quick start:
      edgesmith recipe init recipe.yaml       # a commented template
      edgesmith build recipe.yaml -o out/     # compress, export, verify, bundle
      edgesmith run out/bundles/NAME img.png  # predict on files
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    set_quiet(quiet)
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=logging.ERROR if quiet else level,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# --------------------------------------------------------------------------- build


@click.command("build")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Output folder (must not exist unless --force).",
)
@click.option(
    "--force", is_flag=True, help="Replace an existing output folder (atomically, on success)."
)
@click.option(
    "--target", default=None, help="Device profile to build for (overrides the recipe's 'target')."
)
@click.option(
    "--bundle-version",
    type=click.IntRange(min=1),
    default=None,
    help="Bundle version (default: a UTC timestamp).",
)
@click.option(
    "--sign-key",
    type=click.Path(path_type=Path),
    envvar="EDGESMITH_SIGN_KEY",
    default=None,
    help="Ed25519 private key (from `edgesmith keygen`) that signs every bundle [env: EDGESMITH_SIGN_KEY].",
)
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout.")
@click.option(
    "--keep-going",
    is_flag=True,
    help="When some formats fail their checks, still write the formats that passed "
    "(report.json 'partial'; exit 1).",
)
def build_cmd(
    recipe: Path,
    out: Path,
    force: bool,
    target: str | None,
    bundle_version: int | None,
    sign_key: Path | None,
    as_json: bool,
    keep_going: bool,
) -> None:
    """Run RECIPE end to end: stages, export, parity and accuracy checks, bundles, report.

    Writes OUT/report.json, OUT/report.md, OUT/report.png, the artifacts and OUT/bundles/*,
    all at once when every check passed (exit 0), or nothing (exit 1 on a failed check).
    With --keep-going a multi-format build whose stages passed writes the formats that met their
    checks, leaves the others out and still exits 1.
    """
    from edgesmith.pipeline import build
    from edgesmith.recipe import load_recipe, parse_recipe

    r = load_recipe(recipe)
    if target:
        from edgesmith.recipe import dump_recipe

        data = dump_recipe(r)
        data["target"] = target
        r = parse_recipe(data, r.base_dir or recipe.parent, source=str(recipe))
    report = build(
        r,
        out,
        force=force,
        bundle_version=bundle_version,
        on_failure=_print_summary,
        sign_key=sign_key,
        keep_going=keep_going,
    )
    if report is None:  # a torchrun rank other than 0: rank 0 writes and prints
        return
    _print_summary(report)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    echo(f"wrote {out}/report.md, {out}/report.json and {len(report['artifacts'])} bundle(s)")


def _print_summary(report: dict[str, Any]) -> None:
    from edgesmith.report import print_summary

    print_summary(report)


# --------------------------------------------------------------------------- recipe


@click.group("recipe")
def recipe_group() -> None:
    """Create and validate recipes."""


@recipe_group.command("check")
@click.argument("recipe", type=click.Path(path_type=Path))
def recipe_check(recipe: Path) -> None:
    """Validate RECIPE (schema, names, file paths) without running anything."""
    from edgesmith.recipe import load_recipe

    r = load_recipe(recipe)
    missing = []
    if r.model.weights and not Path(r.model.weights).exists():
        missing.append(f"model.weights: {r.model.weights}")
    if (
        r.model.factory
        and ".py:" in r.model.factory
        and not Path(r.model.factory.rsplit(":", 1)[0]).exists()
    ):
        missing.append(f"model.factory: {r.model.factory}")
    if r.data.path and not Path(r.data.path).exists():
        missing.append(f"data.path: {r.data.path}")
    if missing:
        raise EdgesmithError(
            f"{recipe}: files not found: " + "; ".join(missing),
            hint="paths in a recipe are relative to the recipe's folder",
        )
    stages = " -> ".join(s.name for s in r.stages) or "(no stages)"
    click.echo(
        f"{recipe}: ok: {r.name} for {r.target}; stages: {stages}; export: {', '.join(r.export)}"
    )


@recipe_group.command("init")
@click.argument("path", type=click.Path(path_type=Path), default=Path("recipe.yaml"))
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def recipe_init(path: Path, force: bool) -> None:
    """Write a commented recipe template to PATH (default recipe.yaml)."""
    from edgesmith.fsutil import atomic_write_bytes

    if path.exists() and not force:
        raise EdgesmithError(
            f"{path} already exists", hint="pass --force to overwrite it, or give another path"
        )
    template = (Path(__file__).parent / "templates" / "recipe.yaml").read_bytes()
    atomic_write_bytes(path, template)
    click.echo(f"wrote {path}; edit it, then run `edgesmith recipe check {path}`")


# --------------------------------------------------------------------------- export


@click.command("export")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option(
    "-f", "--format", "fmt", default="onnx", show_default=True, help="Format to export (onnx, ...)."
)
@click.option(
    "-o", "--out", type=click.Path(path_type=Path), required=True, help="Model file to write."
)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def export_cmd(recipe: Path, fmt: str, out: Path, force: bool) -> None:
    """Export RECIPE's model (no stages) to one format and check parity on the evaluation set.

    Exit 1, and no file left behind, when the exported model disagrees with PyTorch.
    """
    import tempfile

    from edgesmith.errors import CheckFailed
    from edgesmith.export import EXPORTERS
    from edgesmith.pipeline import Evaluator, _export, _measure, prepare
    from edgesmith.recipe import load_recipe

    if fmt not in EXPORTERS:
        raise EdgesmithError(
            f"unknown format '{fmt}'", hint=f"known formats: {', '.join(EXPORTERS)}"
        )
    if out.exists() and not force:
        raise EdgesmithError(f"{out} already exists", hint="pass --force to overwrite it")
    p = prepare(load_recipe(recipe))
    base = _measure(p.model, p)
    ref, targets = base["outputs"], base["targets"]
    ev = Evaluator(
        p.recipe,
        ref,
        targets,
        p.eval_inputs,
        p.metric,
        p.threads,
        outputs=p.outputs,
        layouts=p.layouts,
        timing=[x.numpy() for x in p.examples],
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out.parent) as tmp:
        path = Path(tmp) / out.name
        _export(fmt, p.model, p, path.with_suffix(EXPORTERS[fmt].suffix))
        art = ev.evaluate(path.with_suffix(EXPORTERS[fmt].suffix), fmt, "fp32")
        agreement = (
            f"top-1 agreement {art.parity.top1_agreement:.4f}"
            if art.parity.top1_agreement is not None
            else f"agreement {art.parity.agreement:.6f}"
        )
        click.echo(
            f"{out}: accuracy {art.accuracy:.4f} (PyTorch {base['accuracy']:.4f}); "
            f"{agreement}; max abs diff {art.parity.max_abs_diff:.3g}; "
            f"latency p50 {art.latency_ms:.3f} ms"
        )
        if not art.parity.passed:
            raise CheckFailed(
                f"parity failed: {art.parity.reason}",
                hint="nothing was written; run with --debug, or report the model",
            )
        for f in art.files:
            f.replace(out.parent / (out.stem + f.suffix) if f.suffix != out.suffix else out)


# --------------------------------------------------------------------------- entry point

# OSErrors that the user's machine causes (permissions, a full or read-only disk, a path that is
# a folder, a busy port, an unreachable host): bad input or environment, exit 2 with a hint.
# Any other errno (EBADF, EINVAL, EXDEV, ...) points at a bug and stays an internal error.
_ENV_ERRNO_HINTS: dict[int, str] = {
    errno.EACCES: "check the permissions of {folder}, or choose another path",
    errno.EPERM: "check the permissions of {folder}, or choose another path",
    errno.ENOSPC: "free some space on the disk holding {folder}, or write elsewhere",
    errno.EDQUOT: "your disk quota is used up; free some space, or write elsewhere",
    errno.EFBIG: "the file is too large for that file system; write elsewhere",
    errno.EROFS: "{folder} is on a read-only file system; write elsewhere",
    errno.EISDIR: "{path} is a folder; give a file path",
    errno.ENOTDIR: "a part of {path} is a file, not a folder",
    errno.ENOENT: "check the path, and that the folder {folder} exists",
    errno.EEXIST: "{path} already exists; remove it or choose another path",
    errno.ENOTEMPTY: "{path} is a folder that is not empty; remove it or choose another path",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.ELOOP: "{path} has a loop of symbolic links",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
    errno.ENFILE: "too many open files on this machine; close some programs",
    errno.EIO: "an I/O error: check the disk or the device",
    errno.EBUSY: "{path} is busy; try again, or choose another path",
    errno.ETXTBSY: "{path} is busy; try again, or choose another path",
    errno.ENODEV: "no such device: check {path}",
    errno.ENXIO: "no such device: check {path}",
    errno.EADDRINUSE: "another program uses that address or port; pick another --port",
    errno.EADDRNOTAVAIL: "that address is not on this machine; check --host",
    errno.ECONNREFUSED: "is the server running at that address?",
    errno.ECONNRESET: "the other side closed the connection; try again",
    errno.EHOSTUNREACH: "check the address and the network",
    errno.ENETUNREACH: "check the address and the network",
    errno.ETIMEDOUT: "check the address and the network",
}


def describe_os_error(exc: OSError) -> tuple[str, str] | None:
    """The ``error:`` message and hint for an OSError the user's environment caused, or None
    for one that points at a bug (an internal error)."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host name: {exc.strerror or exc}", "check the host name"
    template = _ENV_ERRNO_HINTS.get(exc.errno) if exc.errno is not None else None
    if template is None:
        return None
    reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "error")
    reason = reason[:1].lower() + reason[1:]
    if exc.filename is None:
        return reason, template.format(path="the path", folder="the folder")
    message = f"{exc.filename}: {reason}"
    path = str(exc.filename)
    if exc.filename2 is not None:  # a rename or link: the destination is the user's path
        message = f"{exc.filename} -> {exc.filename2}: {reason}"
        path = str(exc.filename2)
    folder = str(Path(path).parent)
    return message, template.format(path=path, folder=folder)


def _safe(text: object) -> str:
    """An error text for the terminal: each line escaped (names in messages come from files)."""
    return "\n".join(printable(line) for line in str(text).split("\n"))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI and map errors to exit codes and one-line messages."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        rv = cli.main(args=args, prog_name="edgesmith", standalone_mode=False)
    except EdgesmithError as exc:
        if debug:
            raise
        click.echo(f"error: {_safe(exc.message)}", err=True)
        if exc.hint:
            click.echo(f"hint: {_safe(exc.hint)}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        if type(exc).__name__.startswith("NoArgsIsHelp"):  # bare `edgesmith recipe`: show help
            click.echo(exc.ctx.get_help() if getattr(exc, "ctx", None) else str(exc))  # type: ignore[attr-defined]
            sys.exit(0)
        click.echo(f"error: {_safe(exc.format_message())}", err=True)
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            click.echo(f"hint: see '{ctx.command_path} --help'", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        described = describe_os_error(exc) if isinstance(exc, OSError) else None
        if described is not None:
            click.echo(f"error: {_safe(described[0])}", err=True)
            click.echo(f"hint: {_safe(described[1])}", err=True)
            sys.exit(2)
        click.echo(f"error: internal error: {type(exc).__name__}: {_safe(exc)}", err=True)
        click.echo("hint: rerun with --debug for the traceback and report it as a bug", err=True)
        sys.exit(70)
    sys.exit(rv if isinstance(rv, int) else 0)
