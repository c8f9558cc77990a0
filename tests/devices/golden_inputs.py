"""Fixed inputs of the golden-bytes tests (the expected bytes are in golden/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# a fixed test-only Ed25519 key (seed 0, 1, ..., 31): signatures are deterministic
SEED = bytes(range(32))


def golden_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(SEED)


def golden_files(tmp: Path) -> dict[str, Path]:
    (tmp / "model.onnx").write_bytes(b"\x08\x07edgesmith golden model bytes\n")
    (tmp / "golden.npz").write_bytes(b"not really an npz; only hashed here\n")
    return {"model.onnx": tmp / "model.onnx", "golden.npz": tmp / "golden.npz"}


def golden_manifest() -> dict[str, Any]:
    return {
        "name": "golden-cnn",
        "version": 7,
        "created": "2026-01-02T03:04:05Z",
        "expires": "2027-01-02T03:04:05Z",
        "target": "rpi5",
        "format": "onnx",
        "precision": "int8",
        "model": "model.onnx",
        "inputs": [{"name": "input", "shape": ["batch", 1, 28, 28], "dtype": "float32"}],
        "outputs": [{"name": "output", "shape": ["batch", 10], "dtype": "float32"}],
        "preprocess": {
            "layout": "NCHW",
            "channels": "GRAY",
            "scale": 0.00392156862745098,
            "mean": [0.286],
            "std": [0.353],
        },
        "labels": [
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ],
        "metrics": {"accuracy": 0.9298, "latency_ms": 0.29, "size_bytes": 31},
        "golden": {"file": "golden.npz", "atol": 0.05, "rtol": 0.05, "top1": True},
        "build": {"edgesmith": "0.1.0", "recipe": "golden-cnn"},
    }


def golden_channel() -> Any:
    from edgesmith.devices.ota.channel import Channel, Release

    return Channel(
        channel="stable",
        seq=1767323045,
        created="2026-01-02T03:04:05Z",
        expires="2026-02-01T03:04:05Z",
        releases=[
            Release(
                name="golden-cnn",
                version=7,
                target="rpi5",
                path="bundles/golden-cnn/golden-cnn-7-rpi5.tar",
                size=10240,
                sha256="0" * 64,
                manifest_sha256="f" * 64,
                rollout=20.0,
                published="2026-01-02T03:04:05Z",
            )
        ],
    )
