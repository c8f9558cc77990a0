"""The device side of edgesmith on emulated 64-bit Arm: Cortex-A72 (Raspberry Pi 4) and Cortex-A76 (Pi 5).

A pre-release check (`make arm64-check`), run on any x86-64 Debian/Ubuntu machine with the dev venv
(as root for apt, or with qemu-user-static and debootstrap installed). Nothing but Debian's and
PyPI's package registries is used:

1. userland: Debian bookworm arm64 with Python 3.11 (what Raspberry Pi OS bookworm runs), made with
   debootstrap from Debian's packages and run with qemu-user-static (arm64_userland.py);
2. the project's wheel, the aarch64 wheels of ``edgesmith[ort,litert,openvino,serve,ota]`` from
   PyPI (constraints.txt versions), and ``python3.11 -m venv`` + ``pip install`` under emulation;
3. bundles built here on x86 by ``edgesmith build`` for rpi4, rpi5, jetson-orin-nano and
   generic-arm64 (the reference SmallCNN with its trained weights; the quantize stage only, or the
   full reference recipe with ``--full``), signed, plus one x86-cpu OpenVINO bundle as the
   negative control;
4. for each emulated core, with a real board's /proc/cpuinfo and device-tree model: every bundle
   through ``edgesmith.runtime.load`` + its golden check, outputs on real test images against x86,
   ``edgesmith devices detect``, ``bundle verify --target``, ``edgesmith run``, ``edgesmith serve``
   answering one Open Inference Protocol v2 request, and one ``ota agent`` update from a loopback
   store; then each Arm profile's ``verified`` claims are checked against what ran.

    .venv/bin/python benchmarks/arm64_emulated.py [--cores cortex-a72,cortex-a76] [--full]

Prints a table per core, writes ``benchmarks/results/arm64_emulated.json`` and exits 1 when a check
fails. Caches under ``benchmarks/.cache/arm64`` (``--cache``). Emulated timings are not device
timings: they are recorded only to size the check itself.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from arm64_device_checks import CORES, NAME, ROOT, Checks, _cli_checks, _edgesmith
from arm64_userland import (
    Emulator,
    build_wheel,
    download_wheels,
    ensure_rootfs,
    ensure_tools,
    ensure_venv,
    set_board,
)

RESULTS = ROOT / "benchmarks" / "results"
BOARDS = ROOT / "tests" / "devices" / "data" / "roots"
GUEST = Path(__file__).resolve().parent / "arm64_guest.py"
TARGETS = ["rpi4", "rpi5", "jetson-orin-nano", "generic-arm64"]
CONTROL = "x86-cpu"  # its OpenVINO int8 bundle must be refused on Arm, saying it would run in fp32


def _recipe(target: str, formats: list[str], full: bool) -> dict[str, Any]:
    base_file = ROOT / "examples" / "fashion_mnist" / "recipe.yaml"
    recipe = yaml.safe_load(base_file.read_text())
    model = recipe["model"]
    factory, _, attr = model["factory"].partition(":")
    model["factory"] = f"{(base_file.parent / factory).resolve()}:{attr}"
    model["weights"] = str((base_file.parent / model["weights"]).resolve())
    recipe.update(name=NAME, target=target, export=formats)
    if not full:  # the trained weights as they are: int8 only, a smaller evaluation set
        recipe["stages"] = [{"quantize": {"scheme": "int8", "max_accuracy_drop": 0.01}}]
        recipe["data"].update(calibration=256, eval=1000)
    return recipe


def build_bundles(cache: Path, src_key: str, full: bool) -> tuple[dict[str, Path], Path]:
    """Bundles per target (``out/TARGET/bundles/*``), built once per source, recipe and key."""
    from edgesmith.runtime.profiles import load_profile

    keys = cache / "keys"
    if not (keys / "release.pub").is_file():
        keys.mkdir(parents=True, exist_ok=True)
        _edgesmith("keygen", "-o", str(keys / "release"), "--force")
    recipes = {
        t: _recipe(t, [f for f in load_profile(t).formats if f != "openvino"], full)
        for t in TARGETS
    }
    recipes[CONTROL] = _recipe(CONTROL, ["openvino"], full)
    import hashlib

    h = hashlib.sha256((src_key + json.dumps(recipes, sort_keys=True)).encode())
    h.update((keys / "release.pub").read_bytes())
    out = cache / "bundles" / h.hexdigest()[:16]
    if not (out / ".done").is_file():
        if (cache / "bundles").is_dir():
            shutil.rmtree(cache / "bundles")
        out.mkdir(parents=True)
        for target, recipe in recipes.items():
            print(f"building the {target} bundles (x86)", flush=True)
            path = out / f"{target}.yaml"
            path.write_text(yaml.safe_dump(recipe, sort_keys=False))
            _edgesmith(
                "build",
                str(path),
                "-o",
                str(out / target),
                "--sign-key",
                str(keys / "release.key"),
                "--bundle-version",
                "1",
                "--force",
                log=out / f"{target}.log",
            )
        (out / ".done").write_text("ok\n")
    return {t: out / t / "bundles" for t in recipes}, keys


def _tasks(bundles: dict[str, Path]) -> list[dict[str, Any]]:
    from edgesmith.runtime.profiles import load_profile

    tasks = []
    for target, folder in bundles.items():
        profile = load_profile(target)
        device = "cpu" if profile.require_accelerator else "auto"
        for b in sorted(folder.iterdir()):
            task = {"target": target, "bundle": str(b), "device": device, "expect_error": None}
            if target == CONTROL and b.name.endswith("-int8"):
                task["expect_error"] = "would run it in fp32"
            tasks.append(task)
        if profile.require_accelerator:  # device=auto without the GPU build: a clear error
            first = sorted(folder.iterdir())[0]
            tasks.append(
                {
                    "target": target,
                    "bundle": str(first),
                    "device": "auto",
                    "expect_error": "GPU build of onnxruntime",
                }
            )
    return tasks


def _x86_outputs(tasks: list[dict[str, Any]], images: np.ndarray) -> dict[str, np.ndarray]:
    from edgesmith.runtime import load

    return {
        t["bundle"]: np.asarray(load(t["bundle"], device="cpu")(images))
        for t in tasks
        if not t["expect_error"]
    }


def _compare(
    tasks: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    x86: dict[str, np.ndarray],
    core: str,
    checks: Checks,
) -> list[dict[str, Any]]:
    table = []
    for task, row in zip(tasks, rows, strict=True):
        name = Path(task["bundle"]).name
        if task["expect_error"]:
            text = f"{row.get('error', '')} {row.get('hint', '')}"
            checks.add(
                core,
                f"{name} device={task['device']} refused",
                task["expect_error"] in text,
                row.get("error", "it loaded")[:300],
            )
            continue
        if "error" in row:
            checks.add(core, f"load {name}", False, row["error"])
            continue
        got, ref = np.asarray(row["outputs"], np.float32), x86[task["bundle"]]
        diff = float(np.abs(got - ref).max())
        agree = float((got.argmax(1) == ref.argmax(1)).mean())
        golden = row["golden"]
        fmt, precision = name.removeprefix(f"{NAME}-").split("-")
        info = row["info"]
        table.append(
            {
                "target": task["target"],
                "format": fmt,
                "precision": precision,
                "device": task["device"],
                "backend": info["backend"],
                "provider": info["provider"],
                "runs_as": info["precision"],
                "max_abs_diff_vs_x86": diff,
                "top1_agreement_vs_x86": agree,
                "golden_ok": golden["ok"],
                "golden_max_abs_diff": golden.get("max_abs_diff"),
            }
        )
        checks.add(
            core,
            f"{task['target']} {fmt} {precision} golden",
            golden["ok"],
            golden.get("reason") or f"max diff vs x86 {diff:.2g}, top-1 agreement {agree:.3f}",
        )
    return table


def _claims(results: dict[str, list[dict[str, Any]]], checks: Checks) -> None:
    """Each Arm profile's ``verified`` entries must hold on the cores they name that ran here."""
    from edgesmith.runtime.profiles import load_profile

    for target in TARGETS:
        profile = load_profile(target)
        for v in profile.verified:
            for cpu in v.cpus:
                if cpu not in results:
                    continue
                for precision in v.precisions:
                    rows = [
                        r
                        for r in results[cpu]
                        if (r["target"], r["format"], r["precision"])
                        == (target, v.format, precision)
                    ]
                    ok = bool(rows) and all(
                        r["golden_ok"]
                        and r["provider"] == v.provider
                        and r["device"] == v.device
                        and r["precision"] == r["runs_as"]
                        for r in rows
                    )
                    checks.add(
                        cpu,
                        f"profile {target}: {v.format} {precision} on {v.provider}",
                        ok,
                        "" if ok else f"not proven: {rows}",
                    )
        built = {
            (r["format"], r["precision"])
            for rows in results.values()
            for r in rows
            if r["target"] == target
        }
        claimed = {(v.format, p) for v in profile.verified for p in v.precisions}
        checks.add(
            "all",
            f"profile {target} claims every bundle its build makes",
            built <= claimed,
            f"unclaimed: {sorted(built - claimed)}" if built - claimed else "",
        )


def _print_table(core: str, table: list[dict[str, Any]]) -> None:
    print(f"\n{core} ({CORES[core]} board files): emulated, timings are not device timings")
    print(
        "| target | format | precision | runs as | provider | max abs diff vs x86 | top-1 vs x86 | golden |"
    )
    print("|---|---|---|---|---|---:|---:|---|")
    for r in table:
        print(
            f"| {r['target']} | {r['format']} | {r['precision']} | {r['runs_as']} | "
            f"{r['provider']} | {r['max_abs_diff_vs_x86']:.2g} | {r['top1_agreement_vs_x86']:.3f} | "
            f"{'pass' if r['golden_ok'] else 'FAIL'} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--cores", default=",".join(CORES), help="qemu CPU models (cortex-a72, cortex-a76)"
    )
    ap.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache" / "arm64")
    ap.add_argument(
        "--images", type=int, default=200, help="Fashion-MNIST test images compared with x86"
    )
    ap.add_argument(
        "--full", action="store_true", help="the full reference recipe (prune, distill, int8)"
    )
    ap.add_argument("--skip-cli", action="store_true", help="only load + golden + parity (faster)")
    ap.add_argument(
        "--setup-only",
        action="store_true",
        help="make the caches (userland, wheels, venv, bundles) only",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "arm64_emulated.json")
    args = ap.parse_args()
    cores = [c for c in args.cores.split(",") if c]
    bad = [c for c in cores if c not in CORES]
    if bad:
        sys.exit(f"error: unknown core {bad[0]}\nhint: use {', '.join(CORES)}")
    os.nice(10)  # the machine is shared: the emulation yields to interactive work
    cache = args.cache.resolve()
    cold = {  # which caches this run had to make
        "rootfs": not (cache / "rootfs" / ".edgesmith-userland").is_file(),
        "venv": not (cache / "venv-cp311" / ".edgesmith-wheels").is_file(),
        "bundles": not any((cache / "bundles").glob("*/.done")),
    }
    timings: dict[str, float] = {}
    cpu_s: dict[str, float] = {}  # CPU seconds (this process and its children): steadier than
    # wall time on a shared machine, and what an idle 2-core machine would need at least / 2

    def cpu() -> float:
        me, kids = (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    t_all = t = time.perf_counter()
    c = cpu()

    def lap(name: str) -> None:
        nonlocal t, c
        now, c_now = time.perf_counter(), cpu()
        timings[name], cpu_s[name] = round(now - t, 1), round(c_now - c, 1)
        print(f"-- {name}: {timings[name]:.0f} s wall, {cpu_s[name]:.0f} s CPU", flush=True)
        t, c = now, c_now

    ensure_tools()
    rootfs = ensure_rootfs(cache)
    lap("userland")
    wheel, src_key = build_wheel(cache / "dist")
    wheels = download_wheels(wheel, cache / "wheels-cp311")
    lap("wheels")
    work = cache / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    set_board(rootfs, BOARDS / CORES[cores[0]])
    python = ensure_venv(Emulator(rootfs, cores[0], work / "home"), cache, wheels, wheel)
    lap("venv")
    bundles, keys = build_bundles(cache, src_key, args.full)
    lap("bundles")
    if args.setup_only:
        print(json.dumps({"cold": cold, "timings_s": timings, "cpu_s": cpu_s}))
        return

    from edgesmith.data import read_fashion_mnist

    images = read_fashion_mnist("/usr/share/datasets/fashion-mnist", "test")[0][: args.images]
    np.save(work / "images.npy", images)
    from PIL import Image

    Image.fromarray(images[0]).save(work / "image.png")
    tasks = _tasks(bundles)
    x86 = _x86_outputs(tasks, images)
    (work / "tasks.json").write_text(
        json.dumps({"images": str(work / "images.npy"), "bundles": tasks})
    )
    lap("x86 reference")

    checks, results, versions = Checks(), {}, {}
    for core in cores:
        set_board(rootfs, BOARDS / CORES[core])
        emu = Emulator(rootfs, core, work / "home")
        print(f"== {core} ({CORES[core]} board files)", flush=True)
        log = work / f"guest-{core}.log"
        proc = emu.popen(
            python, str(GUEST), str(work / "tasks.json"), str(work / f"guest-{core}.json"),
            cwd=work, log=log,
        )  # fmt: skip
        if proc.wait(timeout=3600):
            checks.add(core, "guest checks", False, log.read_text()[-2000:])
            continue
        guest = json.loads((work / f"guest-{core}.json").read_text())
        versions[core] = guest["versions"]
        results[core] = _compare(tasks, guest["rows"], x86, core, checks)
        if not args.skip_cli:
            _cli_checks(emu, python, core, bundles, keys, work, checks)
        lap(f"core {core}")
    _claims(results, checks)
    for core, table in results.items():
        _print_table(core, table)
    timings["total"] = round(time.perf_counter() - t_all, 1)
    cpu_s["total"] = round(sum(cpu_s.values()), 1)
    report = {
        "cores": cores,
        "cold": cold,
        "timings_s": timings,
        "cpu_s": cpu_s,
        "versions": versions,
        "results": results,
        "checks": checks.items,
        "failed": len(checks.failed),
        "note": "emulated under qemu-user on x86-64: timings size the check, not the devices",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"\n{len(checks.items) - len(checks.failed)} passed, {len(checks.failed)} failed "
        f"in {timings['total']:.0f} s; wrote {args.out}"
    )
    sys.exit(1 if checks.failed else 0)


if __name__ == "__main__":
    main()
