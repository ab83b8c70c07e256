"""Write a Triton Inference Server model repository for the shipped networks.

Each network becomes ``DIR/<bundle>__<graph>/`` with ``1/model.onnx`` and a
``config.pbtxt``: ONNX Runtime platform, batch dimension left to Triton
(``max_batch_size``) with dynamic batching so requests from several nodes share a
batch, one instance per GPU (or CPU where the server has none), and, where the model
card allows FP16, Triton's TensorRT accelerator for the ONNX model on its GPU. The ONNX file is
written from the bytes checked against the model card, and its SHA-256 goes into the
configuration (``parameters { key: "onnx_sha256" ... }``): the node's Triton client refuses a
served model whose hash differs from its own bundle's.
"""
from __future__ import annotations

from pathlib import Path

from engines.bundle import VerifiedFile, load_bundle, read_verified
from engines.graph_io import read_io
from engines.triton_backend import SHA_PARAMETER, model_name

MAX_QUEUE_DELAY_US = 500


def _tensor(name: str, shape: tuple[int | None, ...]) -> str:
    dims = ", ".join(str(d) for d in shape[1:])
    return f"  {{ name: \"{name}\" data_type: TYPE_FP32 dims: [ {dims} ] }}"


def config_pbtxt(name: str, onnx: VerifiedFile, max_batch: int, fp16: bool, kind: str) -> str:
    io = read_io(onnx.data)
    lines = [
        f"name: \"{name}\"",
        "platform: \"onnxruntime_onnx\"",
        f"max_batch_size: {max_batch}",
        "input [",
        ",\n".join(_tensor(n, s) for n, s in io.inputs.items()),
        "]",
        "output [",
        ",\n".join(_tensor(n, s) for n, s in io.outputs.items()),
        "]",
        f"dynamic_batching {{ max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US} }}",
        f"instance_group [ {{ count: 1 kind: {kind} }} ]",
        f"parameters {{ key: \"{SHA_PARAMETER}\" value: {{ string_value: \"{onnx.sha256}\" }} }}",
    ]
    if fp16 and kind == "KIND_GPU":
        lines.append('optimization { execution_accelerators { gpu_execution_accelerator : [ { name : "tensorrt" '
                     'parameters { key: "precision_mode" value: "FP16" } } ] } }')
    return "\n".join(lines) + "\n"


def export_repository(out_dir: Path, bundles: list[str], max_batch: int = 512, gpu: bool = True) -> list[Path]:
    """Write one Triton model per ONNX network of each bundle; returns the model folders."""
    written = []
    for bundle_name in bundles:
        bundle = load_bundle(bundle_name)
        fp16 = bool(bundle.card.raw.get("inference", {}).get("fp16", False))
        for onnx_path in sorted(bundle.path.glob("*.onnx")):
            name = model_name(bundle.path.name, onnx_path.stem)
            model_dir = out_dir / name
            (model_dir / "1").mkdir(parents=True, exist_ok=True)
            onnx = read_verified(onnx_path)
            (model_dir / "1" / "model.onnx").write_bytes(onnx.data)
            (model_dir / "config.pbtxt").write_text(
                config_pbtxt(name, onnx, max_batch, fp16, "KIND_GPU" if gpu else "KIND_CPU"), encoding="utf-8")
            written.append(model_dir)
    return written
