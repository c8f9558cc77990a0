"""How long an OTA update takes on this machine, step by step, and how a simulated fleet scales.

Baseline (measured in the same run): ``edgesmith.runtime.load(bundle)`` plus one inference, what
a device app does at start anyway. Every step of an update is reported in ms and as a ratio to
that baseline; the fleet rows report the wall time for N agents (threads, one process) to take
an announced update from a loopback HTTP store and a real mosquitto broker.

Run:
    .venv/bin/python benchmarks/ota_update.py [--bundle out/fmnist/bundles/fmnist-cnn-onnx-fp32]
        [--fleet 20 50] [--repeats 5]

Writes benchmarks/results/ota_update.json.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import itertools
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def reference_bundle(work: Path) -> Path:
    from edgesmith.pipeline import build
    from edgesmith.progress import set_quiet
    from edgesmith.recipe import load_recipe

    set_quiet(True)
    report = build(
        load_recipe(ROOT / "examples/fashion_mnist/recipe-fp32.yaml"),
        work / "build",
        bundle_version=1,
    )
    return work / "build" / report["artifacts"][0]["bundle"]


def derive(src: Path, out: Path, version: int, key: Path) -> Path:
    from edgesmith.runtime.bundle import derived_manifest, read_bundle, write_bundle

    m = read_bundle(src)
    files = {rel: src / rel for rel in m.files}
    write_bundle(out, derived_manifest(m, version=version), files, sign_key=key)
    return out


def serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


def baseline_ms(bundle: Path, repeats: int) -> float:
    import numpy as np

    from edgesmith.runtime import load

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model = load(bundle)
        with np.load(bundle / "golden.npz", allow_pickle=False) as g:
            model(g["inputs"][:1])
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def one_update(provisioned: Path, work: Path, url: str, pub: Path) -> dict[str, float]:
    """One device takes one update; returns ms spent in each step (step -> next step)."""
    from edgesmith.devices.ota import Agent, AgentConfig

    root = work / f"dev-{time.perf_counter_ns()}"
    shutil.copytree(provisioned, root, symlinks=True)
    marks: list[tuple[str, float]] = []
    cfg = AgentConfig(
        root=root,
        server=url,
        trusted_keys=[pub],
        target="x86-cpu",
        device_id=root.name,
        switch_grace_s=0,
    )
    agent = Agent(cfg, step_hook=lambda s: marks.append((s, time.perf_counter())))
    agent.start()
    try:
        result = agent.check_once()
        marks.append(("end", time.perf_counter()))
    finally:
        agent.close()
    assert result.status == "installed", result
    phases: dict[str, float] = {}
    for (name, t), (_, t_next) in itertools.pairwise(marks):
        phases[name.split(":")[0]] = phases.get(name.split(":")[0], 0.0) + (t_next - t) * 1000
    phases["total"] = (marks[-1][1] - marks[0][1]) * 1000
    shutil.rmtree(root)
    return phases


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fleet_rollout(
    n: int, provisioned: Path, work: Path, store: Path, url: str, keys: dict[str, Path], v2: Path
) -> float | None:
    """Seconds from the MQTT announcement until all n agents report version 2 (None: no broker)."""
    import paho.mqtt.client as mqtt

    from edgesmith.devices.ota import Agent, AgentConfig, publish
    from edgesmith.devices.ota.mqtt import announce

    if not os.access("/usr/sbin/mosquitto", os.X_OK):
        return None
    port = free_port()
    conf = work / f"mosq-{n}.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    broker = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    addr = f"127.0.0.1:{port}"
    done: dict[str, int] = {}
    board = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench")
    board.on_message = lambda c, u, m: done.__setitem__(
        json.loads(m.payload)["device_id"], json.loads(m.payload)["version"]
    )
    board.connect("127.0.0.1", port)
    board.subscribe("edgesmith/stable/status/+", qos=1)
    board.loop_start()
    agents, threads = [], []
    try:
        for i in range(n):
            root = work / f"fleet{n}-{i}"
            shutil.copytree(provisioned, root, symlinks=True)
            cfg = AgentConfig(
                root=root,
                server=url,
                trusted_keys=[keys["pub"]],
                target="x86-cpu",
                device_id=root.name,
                mqtt=addr,
                switch_grace_s=0,
                poll_interval_s=3600,
            )
            agents.append(Agent(cfg))
            threads.append(threading.Thread(target=agents[-1].run, daemon=True))
            threads[-1].start()
        while len(done) < n:  # every agent has reported its first check
            time.sleep(0.05)
        _, ch = publish(v2, store, "stable", keys["key"])
        t0 = time.perf_counter()
        announce(addr, "stable", {"channel": "stable", "seq": ch.seq})
        while sum(v == 2 for v in done.values()) < n:
            time.sleep(0.01)
        return time.perf_counter() - t0
    finally:
        for a in agents:
            a.stop()
        for t in threads:
            t.join(timeout=30)
        board.loop_stop()
        broker.terminate()
        broker.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--bundle", type=Path, help="a reference bundle folder (default: build one, ~15 s)"
    )
    ap.add_argument("--fleet", type=int, nargs="*", default=[20, 50])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from edgesmith.devices.ota import Agent, AgentConfig, publish
    from edgesmith.runtime.signing import generate_keypair

    with tempfile.TemporaryDirectory(prefix="ota-bench-") as tmp:
        work = Path(tmp)
        src = args.bundle or reference_bundle(work)
        key, pub, _ = generate_keypair(work / "release")
        keys = {"key": key, "pub": pub}
        v1, v2 = derive(src, work / "v1", 1, key), derive(src, work / "v2", 2, key)
        provisioned = work / "provisioned"
        agent = Agent(
            AgentConfig(root=provisioned, trusted_keys=[pub], target="x86-cpu", device_id="p")
        )
        assert agent.install(v1).status == "installed"
        agent.close()
        store = work / "store"
        publish(v2, store, "stable", key)
        srv, url = serve(store)
        base = baseline_ms(v2, args.repeats)
        runs = [one_update(provisioned, work, url, pub) for _ in range(args.repeats)]
        steps = [s for s in runs[0] if s != "total"] + ["total"]
        table = {s: statistics.median(r.get(s, 0.0) for r in runs) for s in steps}
        print(f"baseline: load + 1 inference = {base:.1f} ms (median of {args.repeats})")
        print(f"{'step':16} {'ms':>9} {'x baseline':>11}")
        for s, ms in table.items():
            print(f"{s:16} {ms:9.1f} {ms / base:11.2f}")
        store2 = work / "store2"
        publish(v1, store2, "stable", key)
        srv.shutdown()
        srv2, url2 = serve(store2)
        fleet = {}
        for n in args.fleet:
            secs = fleet_rollout(n, provisioned, work, store2, url2, keys, v2)
            if secs is None:
                print("fleet: skipped (no /usr/sbin/mosquitto)")
                break
            # the next size starts from version 1 again
            shutil.rmtree(store2)
            publish(v1, store2, "stable", key, force_channel=True)
            fleet[n] = secs
            print(
                f"fleet of {n:3d}: all updated {secs:6.2f} s after the announcement "
                f"({secs * 1000 / n:6.1f} ms per device, {secs * 1000 / n / table['total']:.2f}x one update)"
            )
        srv2.shutdown()
        bundle_bytes = sum(p.stat().st_size for p in v2.iterdir())
    out = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "bundle_bytes": bundle_bytes,
        "baseline_ms": base,
        "steps_ms": table,
        "steps_ratio": {s: v / base for s, v in table.items()},
        "fleet_seconds": fleet,
        "repeats": args.repeats,
    }
    dest = ROOT / "benchmarks" / "results" / "ota_update.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
