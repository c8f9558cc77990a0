"""``edgesmith bench`` through the CLI: scenarios, comparison, JSON/Markdown/PNG output."""

from __future__ import annotations

import json

from click.testing import CliRunner

from edgesmith.cli import cli
from edgesmith.errors import InputError


def test_bench_compares_models_in_fresh_processes(models, tmp_path):
    out, md, png = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    args = ["bench", str(models.bundle), str(models.tflite), "--threads", "1,2", "-n", "30"]
    args += ["--warmup", "3", "--offline-seconds", "0.2", "-b", "16", "-o", str(out)]
    args += ["--markdown", str(md), "--plot", str(png)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    first, second = report["models"]
    assert (first["backend"], second["backend"]) == ("onnxruntime", "litert")
    assert first["vs_first"]["single_stream_speedup"] == 1.0
    assert second["vs_first"]["offline_throughput_ratio"] > 0
    for m in report["models"]:
        assert m["cold_start_ms"] > m["load_ms"] > 0  # measured from outside the fresh process
        assert m["peak_rss_mb"] > 20
        assert [r["threads"] for r in m["results"]] == [1, 2]
        for r in m["results"]:
            s = r["single_stream"]
            assert s["runs"] >= 30 and 0 < s["p50"] <= s["p90"] <= s["p99"]
            assert r["offline"]["batch"] == 16 and r["offline"]["samples_per_s"] > 0
    text = md.read_text()
    assert (
        "| model | backend / provider |" in text
        and "fmnist-cnn-v1" in text
        and "ref.tflite" in text
    )
    assert text in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_missing_models_and_bad_thread_lists(tmp_path):
    result = CliRunner().invoke(cli, ["bench", str(tmp_path / "nope.onnx")])
    assert isinstance(result.exception, InputError) and "model not found" in str(result.exception)
    result = CliRunner().invoke(cli, ["bench", str(tmp_path), "--threads", "two"])
    assert result.exit_code == 2 and "comma-separated list of integers" in result.output
