"""`edgesmith finetune` from the command line: the next bundle version, incremental runs with a
replay file, and the progress line with loss and accuracy. Real SmallCNN bundles and images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgesmith.cli import main
from edgesmith.data import FASHION_MNIST_LABELS
from edgesmith.runtime import load
from tests.finetune_helpers import fmnist, image_folder, restrict_classes, write_images

LABELS = FASHION_MNIST_LABELS


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


def test_cli_writes_the_next_version(
    head_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = image_folder(tmp_path / "data", LABELS, range(300), range(300, 400))
    out = tmp_path / "v2"
    code, stdout, err = run(
        capsys, "-q", "finetune", str(head_bundle), "--data", str(data), "-o", str(out),
        "--epochs", "8", "--optimizer", "sgd", "--json",
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["version"] == 2 and doc["bundle"] == str(out)
    assert doc["trained"]["samples"] == 300 and doc["trained"]["holdout_samples"] == 100
    assert doc["trained"]["optimizer"] == "sgd" and 1 <= len(doc["history"]) <= 8
    assert doc["metrics"]["feature_cache"] == {"hits": 0, "misses": 400}
    model = load(out)
    assert model.version == 2 and model.manifest.metrics["build"]["accuracy"] > 0.9
    assert model.manifest.metrics["accuracy"] == doc["metrics"]["holdout_accuracy"]
    code, _, err = run(capsys, "finetune", str(head_bundle), "--data", str(data), "-o", str(out))
    assert code == 2 and "already exists" in err  # never overwritten


def test_cli_incremental_runs_with_a_replay_file_do_not_forget(
    head_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run 1: classes 0-7 arrive; run 2: only Bag images arrive (a new class). With the replay
    file of run 1 the head still knows classes 0-7; without it, it calls everything a bag."""
    b8 = restrict_classes(head_bundle, tmp_path / "b8", 8)
    x, y = fmnist("train")
    first = np.flatnonzero(y < 8)[:500]
    bags = np.flatnonzero(y == 8)[:160]
    d1 = write_images(tmp_path / "d1", x[first], [LABELS[i] for i in y[first]])
    write_images(tmp_path / "d2" / "train", x[bags[:120]], ["Bag"] * 120)
    write_images(tmp_path / "d2" / "val", x[bags[120:]], ["Bag"] * 40)
    replay = tmp_path / "replay.npz"
    common = ["-q", "finetune", "--epochs", "15", "--lr", "0.01", "--json"]
    code, _, err = run(
        capsys,
        *common,
        str(b8),
        "--data",
        str(d1),
        "-o",
        str(tmp_path / "v2"),
        "--replay",
        str(replay),
    )
    assert code == 0, err
    assert replay.is_file() and replay.stat().st_mode & 0o077 == 0
    results = {}
    for tag, extra in (("replay", ["--replay", str(replay)]), ("none", [])):
        out = tmp_path / f"v3-{tag}"
        code, stdout, err = run(
            capsys, *common, str(tmp_path / "v2"), "--data", str(tmp_path / "d2"),
            "--add-classes", "-o", str(out), *extra,
        )  # fmt: skip
        assert code == 0, err
        doc = json.loads(stdout)
        model = load(out)
        xt, yt = fmnist("test")
        old = yt < 8
        pred = model(xt[:1000][old[:1000]]).argmax(1)
        bag_pred = model(xt[:1000][yt[:1000] == 8]).argmax(1)
        results[tag] = (
            float((pred == yt[:1000][old[:1000]]).mean()),
            float((bag_pred == 8).mean()),
            doc["trained"]["replay_samples"],
        )
    assert results["replay"][2] > 300 and results["none"][2] == 0
    assert results["replay"][0] > 0.85, results  # classes 0-7 still recognised
    assert results["none"][0] < 0.5, results  # forgotten without replay
    assert results["replay"][1] > 0.8, results  # and Bag was learnt


def test_progress_line_shows_loss_and_accuracy(capsys: pytest.CaptureFixture[str]) -> None:
    from edgesmith.progress import _plain, is_quiet, set_quiet

    quiet = is_quiet()
    set_quiet(False)  # `-q` in an earlier CLI test leaves it on
    try:
        status: dict[str, object] = {}
        for i in _plain(range(3), "fine-tune head", 3, every=0.0, status=status):
            status.update(loss=1.0 / (i + 1), accuracy=0.5 + i / 10)
    finally:
        set_quiet(quiet)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "fine-tune head: 3/3 (0 s, eta 0 s) loss 0.3333 accuracy 0.7"


def test_finetune_on_the_device_imports_no_torch(head_bundle: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    data = image_folder(tmp_path / "data", LABELS, range(100))
    code = (
        "import sys, json\nfrom edgesmith.cli import main\n"
        f"try:\n    main(['-q', 'finetune', {str(head_bundle)!r}, '--data', {str(data)!r}, "
        f"'-o', {str(tmp_path / 'v2')!r}, '--epochs', '2'])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        # VmHWM: this process's own peak (ru_maxrss keeps the pytest parent's peak across exec)
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
        "print(int(hwm.split()[1]))\n"
        "print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    peak_kib = int(res.stdout.strip().splitlines()[-2])
    assert peak_kib < 1 << 20, f"peak RSS {peak_kib / 1024:.0f} MiB: the target is under 1 GB"
    loaded = json.loads(res.stdout.strip().splitlines()[-1])
    assert "onnxruntime" in loaded and (tmp_path / "v2" / "head.npz").is_file()
    assert [m for m in ("torch", "onnx", "tensorflow", "matplotlib") if m in loaded] == []
