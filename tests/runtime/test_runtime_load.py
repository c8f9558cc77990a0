"""``load()`` on every backend with the reference model, model.info, and bad models and inputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgesmith.errors import BundleError, EdgesmithError, InputError, ModelLoadError
from edgesmith.runtime import load
from edgesmith.runtime.backends import backend_for
from edgesmith.runtime.onnxfile import scan_onnx


def _top1(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).argmax(axis=1)


@pytest.mark.parametrize(
    ("fmt", "backend", "provider"),
    [
        ("onnx", "onnxruntime", "CPUExecutionProvider"),
        ("onnx", "openvino", "CPU"),
        ("xml", "openvino", "CPU"),
        ("tflite", "litert", "XNNPACK"),
    ],
)
def test_backends_agree_on_real_images(models, fmt, backend, provider):
    x = models.inputs[:500]
    ref = load(models.onnx, device="cpu", backend="onnxruntime")(x)
    model = load(getattr(models, fmt), device="cpu", backend=backend)
    out = model(x)
    assert model.info["backend"] == backend
    assert model.info["provider"] == provider
    assert model.info["precision"] == "fp32"  # OpenVINO would run bf16 here unless pinned
    np.testing.assert_array_equal(_top1(out), _top1(ref))
    assert np.abs(out - ref).max() < 1e-4
    assert (_top1(out) == models.labels[:500]).mean() > 0.9  # the trained model, on real images


def test_openvino_precision_is_what_runs(models):
    fast = load(models.xml, device="cpu", options={"precision": "bf16"})
    assert fast.info["precision"] == "bf16"
    assert fast.info["weights"] == "fp32"
    exact = load(models.xml, device="cpu")
    assert np.abs(fast(models.inputs[:64]) - exact(models.inputs[:64])).max() > 1e-5


def test_bundle_preprocesses_uint8_images(models):
    model = load(models.bundle)
    assert (model.name, model.version, model.labels[0]) == ("fmnist-cnn", 1, "T-shirt/top")
    from_images = model(models.images[:32])
    np.testing.assert_allclose(from_images, model(models.inputs[:32]), atol=1e-5)
    top = model.predict(models.images[:1], top_k=2)[0]
    assert top[0][0] == "Ankle boot" and top[0][1] > top[1][1]  # the first test image


def test_bundle_resizes_and_converts_rgb_images(models):
    model = load(models.bundle)
    small = models.images[:16]
    big_rgb = np.repeat(np.repeat(small, 2, axis=1), 2, axis=2)[..., None].repeat(3, axis=-1)
    assert big_rgb.shape == (16, 56, 56, 3)
    out = model(big_rgb)  # RGB -> gray, 56x56 -> 28x28, normalised, NCHW
    assert out.shape == (16, 10)
    assert (out.argmax(1) == model(small).argmax(1)).mean() >= 0.9


def test_bare_file_is_named_by_its_stem(models):
    model = load(models.tflite)
    assert model.name == "ref" and model.version is None and model.info["weights"] == "fp32"


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.zeros((1, 1, 28, 28), np.float64), "has dtype float64, expected float32"),
        (
            np.zeros((1, 28, 28), np.float32),
            r"has shape \[1, 28, 28\], expected \[batch, 1, 28, 28\]",
        ),
        (np.full((2, 1, 28, 28), np.nan, np.float32), "contains NaN or Inf"),
        (np.pad(np.zeros((1, 1, 28, 27), np.float32), 0), "expected"),
    ],
)
def test_bad_inputs_raise_one_clear_error(models, x, match):
    model = load(models.onnx)
    with pytest.raises(InputError, match=match) as info:
        model(x)
    assert info.value.hint


def test_inf_is_rejected_and_nan_policy_allow_passes(models):
    x = models.inputs[:2].copy()
    x[1, 0, 3, 3] = np.inf
    with pytest.raises(InputError, match="NaN or Inf"):
        load(models.onnx)(x)
    out = load(models.onnx, nan_policy="allow")(x)
    assert np.isfinite(out[0]).all()
    with pytest.raises(EdgesmithError, match="unknown nan_policy"):
        load(models.onnx, nan_policy="zero")  # type: ignore[arg-type]


@pytest.mark.parametrize("suffix", [".onnx", ".tflite", ".xml"])
def test_truncated_model_files_are_refused(models, tmp_path, suffix):
    src = getattr(models, suffix[1:])
    data = src.read_bytes()
    bad = tmp_path / f"cut{suffix}"
    bad.write_bytes(data[: len(data) // 3])
    if suffix == ".xml":
        shutil.copy(src.with_suffix(".bin"), bad.with_suffix(".bin"))
    with pytest.raises(ModelLoadError) as info:
        load(bad)
    assert bad.name in info.value.message and info.value.hint
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        load(empty)


def _external_model(folder: Path, location: str) -> Path:
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    t = numpy_helper.from_array(w, "W")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(w.nbytes))):
        e = t.external_data.add()
        e.key, e.value = k, v
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [t],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"m{abs(hash(location)) % 10_000}.onnx"
    path.write_bytes(m.SerializeToString())
    return path


def test_external_data_inside_the_folder_loads(tmp_path):
    w = np.arange(16, dtype=np.float32)
    (tmp_path / "m" / "data").mkdir(parents=True)
    w.tofile(tmp_path / "m" / "data" / "w.bin")
    path = _external_model(tmp_path / "m", "data/w.bin")
    assert scan_onnx(path).external == ["data/w.bin"]
    out = load(path)(np.eye(4, dtype=np.float32))
    np.testing.assert_array_equal(out, w.reshape(4, 4))


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_folder_is_refused(tmp_path, where):
    secret = tmp_path / "outside" / "secret.bin"
    secret.parent.mkdir()
    np.arange(16, dtype=np.float32).tofile(secret)
    folder = tmp_path / "m"
    folder.mkdir()
    if where == "symlink":
        os.symlink(secret, folder / "link.bin")
    location = {"parent": "../outside/secret.bin", "absolute": str(secret), "symlink": "link.bin"}[
        where
    ]
    path = _external_model(folder, location)
    # our own screen refuses it, before (and whatever) the backend would do
    with pytest.raises(ModelLoadError, match="external data") as info:
        scan_onnx(path)
    assert "model's folder" in info.value.hint
    for backend in ("onnxruntime", "openvino"):
        with pytest.raises(ModelLoadError, match=f"{path.name} points its external data"):
            load(path, backend=backend)


def test_bundle_with_a_wrong_hash_is_refused(models, tmp_path):
    bad = tmp_path / "bundle"
    shutil.copytree(models.bundle, bad)
    data = bytearray((bad / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its SHA-256"):
        load(bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    assert manifest["files"]["model.onnx"]["size"] == len(
        data
    )  # same size: only the hash catches it


def test_device_picks_the_backend_and_falls_back(models, caplog):
    assert backend_for(Path("m.onnx")) == "onnxruntime"
    assert backend_for(Path("m.onnx"), device="npu") == "openvino"
    assert backend_for(Path("m.tflite"), device="edgetpu") == "litert"
    from edgesmith.runtime.backends.onnxruntime import providers_for

    assert providers_for("auto", ["XNNPACKExecutionProvider", "CPUExecutionProvider"])[-1] == (
        "CPUExecutionProvider"
    )
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        model = load(models.onnx, device="cuda")
        assert model.info["provider"] == "CPUExecutionProvider"
        assert "CUDAExecutionProvider is not available" in caplog.text
    tpu = load(models.tflite, device="edgetpu")  # no Edge TPU here: XNNPACK, with a warning
    assert tpu.info["provider"] == "XNNPACK" and "failed to load" in caplog.text


def test_gpu_target_without_the_gpu_build_is_a_clear_error(models, tmp_path):
    """A jetson-orin-nano bundle (TensorRT, CUDA) on an onnxruntime without them: device=auto
    refuses with the reason and the fix instead of quietly running on the CPU; device=cpu runs."""
    import onnxruntime as ort

    from edgesmith.runtime.bundle import write_bundle

    if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()):
        pytest.skip("this onnxruntime has the GPU providers")
    with np.load(models.bundle / "golden.npz", allow_pickle=False) as g:
        np.savez(tmp_path / "golden.npz", inputs=g["inputs"], outputs=g["outputs"])
    manifest = json.loads((models.bundle / "manifest.json").read_text())
    manifest = {
        k: manifest[k]
        for k in (
            "name",
            "version",
            "format",
            "precision",
            "model",
            "inputs",
            "outputs",
            "preprocess",
            "labels",
            "golden",
        )
    }
    bundle = tmp_path / "jetson"
    write_bundle(
        bundle,
        {**manifest, "target": "jetson-orin-nano"},
        {"model.onnx": models.onnx, "golden.npz": tmp_path / "golden.npz"},
    )
    with pytest.raises(ModelLoadError) as exc:
        load(bundle)
    msg = exc.value.message
    assert "'jetson-orin-nano' target runs this model on TensorrtExecutionProvider or " in msg
    assert "has only" in msg and "CPUExecutionProvider" in msg
    assert "GPU build of onnxruntime" in (exc.value.hint or "") and "device='cpu'" in exc.value.hint
    cpu = load(bundle, device="cpu")
    assert cpu.info["provider"] == "CPUExecutionProvider"
    assert (
        _top1(cpu(models.inputs[:8])).tolist()
        == _top1(load(models.onnx)(models.inputs[:8])).tolist()
    )


def test_cuda_runs_fp32_unless_tf32_is_asked_for() -> None:
    """onnxruntime's CUDA default (TF32) moved fp32 logits by 1e-2 on an H200: off unless asked."""
    from edgesmith.runtime.backends.onnxruntime import _provider_options

    assert _provider_options("CUDAExecutionProvider", {})["use_tf32"] == "0"
    assert _provider_options("CUDAExecutionProvider", {"precision": "tf32"})["use_tf32"] == "1"
    mine = {"provider_options": {"CUDAExecutionProvider": {"use_tf32": "1"}}}
    assert _provider_options("CUDAExecutionProvider", mine)["use_tf32"] == "1"  # explicit wins
    assert "use_tf32" not in _provider_options("CPUExecutionProvider", {})
