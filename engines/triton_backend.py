"""A model served by a Triton Inference Server (the path past one machine).

The server serves the repository that ``osteoscreen engines export-triton DIR`` writes:
one model per network, named ``<bundle>__<graph>``, the same ONNX file (Triton may compile
it to TensorRT on its GPU). The client needs the ``triton`` extra (tritonclient).

At open the session reads the served model's configuration: its ``onnx_sha256`` parameter
must be the SHA-256 of the local bundle's (checked) ONNX file, so the server answers with
the network this node would run; its ``max_batch_size`` splits larger calls (exact SHAP
sends thousands of rows at once) into requests Triton accepts; its TensorRT FP16
accelerator, where the export asked for one, is the precision reported.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from engines.batching import run_in_chunks

SHA_PARAMETER = "onnx_sha256"
REEXPORT = "re-export the repository with `osteoscreen engines export-triton` and reload it on the server"


def model_name(bundle: str, graph: str) -> str:
    return f"{bundle}__{graph}"


def served_sha256(config: dict[str, Any]) -> str | None:
    """The ONNX SHA-256 that export-triton wrote into config.pbtxt (``parameters``), or None."""
    value = (config.get("parameters") or {}).get(SHA_PARAMETER) or {}
    return value.get("string_value") if isinstance(value, dict) else None


def served_precision(config: dict[str, Any]) -> str:
    """fp16 where the configuration runs the ONNX model through Triton's TensorRT accelerator in FP16 on a GPU
    instance; fp32 otherwise (ONNX Runtime, or CPU instances, where the GPU accelerator does not apply)."""
    kinds = {g.get("kind", "KIND_AUTO") for g in config.get("instance_group") or []}
    if kinds and kinds <= {"KIND_CPU"}:
        return "fp32"
    accels = ((config.get("optimization") or {}).get("execution_accelerators") or {}).get(
        "gpu_execution_accelerator") or []
    for a in accels:
        mode = str((a.get("parameters") or {}).get("precision_mode", "")).upper()
        if a.get("name") == "tensorrt" and mode == "FP16":
            return "fp16"
    return "fp32"


class TritonSession:
    def __init__(self, url: str, protocol: str, model: str, timeout_s: float, *, onnx_sha256: str) -> None:
        if not url:
            raise RuntimeError("backend triton needs [engines] triton_url (host:port of the Triton server)")
        if protocol == "grpc":
            import tritonclient.grpc as client
        else:
            import tritonclient.http as client
        self._client_mod = client
        kwargs = {"network_timeout": timeout_s, "connection_timeout": timeout_s} if protocol == "http" else {}
        self.client = client.InferenceServerClient(url=url, **kwargs)
        self.model = model
        self.timeout_s = timeout_s
        self.protocol = protocol
        try:
            ready = self.client.is_model_ready(model)
        except Exception as exc:  # noqa: BLE001 - connection errors come in several client-specific types
            self._close_quietly()
            raise RuntimeError(f"Triton server at {url} not reachable: {exc}") from None
        if not ready:
            self._close_quietly()
            raise RuntimeError(f"Triton server at {url} does not serve a ready model {model!r} "
                               "(load the repository written by `osteoscreen engines export-triton`)")
        try:
            config = self._config()
            self._check_identity(config, url, onnx_sha256)
        except BaseException:
            self._close_quietly()
            raise
        self.max_batch = int(config.get("max_batch_size") or 0)  # 0: the model does not batch; no limit here
        self.precision = served_precision(config)

    def _config(self) -> dict[str, Any]:
        if self.protocol == "grpc":
            return self.client.get_model_config(self.model, as_json=True, client_timeout=self.timeout_s)["config"]
        return self.client.get_model_config(self.model)

    def _check_identity(self, config: dict[str, Any], url: str, onnx_sha256: str) -> None:
        served = served_sha256(config)
        if served is None:
            raise RuntimeError(f"Triton model {self.model!r} at {url} does not say which ONNX file it serves (no "
                               f"{SHA_PARAMETER} parameter in its config.pbtxt): {REEXPORT}")
        if served.lower() != onnx_sha256:
            raise RuntimeError(f"Triton model {self.model!r} at {url} serves another network (ONNX SHA-256 "
                               f"{served[:12]}...) than this node's bundle ({onnx_sha256[:12]}...): {REEXPORT}")

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return run_in_chunks(self._infer, names, feeds, self.max_batch)

    def _infer(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        c = self._client_mod
        inputs = []
        for k, v in feeds.items():
            inp = c.InferInput(k, list(v.shape), "FP32")
            inp.set_data_from_numpy(np.ascontiguousarray(v))
            inputs.append(inp)
        outputs = [c.InferRequestedOutput(n) for n in names]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        result = self.client.infer(self.model, inputs, outputs=outputs, **kwargs)
        return [result.as_numpy(n) for n in names]

    def _close_quietly(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001 - closing a client that never connected; the caller's error matters
            pass

    def close(self) -> None:
        self.client.close()
