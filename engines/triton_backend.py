"""A model served by a Triton Inference Server (the path past one machine).

The server serves the repository that ``osteoscreen engines export-triton DIR`` writes:
one model per network, named ``<bundle>__<graph>``, the same ONNX file (Triton may compile
it to TensorRT on its GPU). The client needs the ``triton`` extra (tritonclient).
"""
from __future__ import annotations

import numpy as np


def model_name(bundle: str, graph: str) -> str:
    return f"{bundle}__{graph}"


class TritonSession:
    def __init__(self, url: str, protocol: str, model: str, timeout_s: float) -> None:
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
            raise RuntimeError(f"Triton server at {url} not reachable: {exc}") from None
        if not ready:
            raise RuntimeError(f"Triton server at {url} does not serve a ready model {model!r} "
                               "(load the repository written by `osteoscreen engines export-triton`)")

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        c = self._client_mod
        inputs = []
        for k, v in feeds.items():
            inp = c.InferInput(k, list(v.shape), "FP32")
            inp.set_data_from_numpy(v)
            inputs.append(inp)
        outputs = [c.InferRequestedOutput(n) for n in names]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        result = self.client.infer(self.model, inputs, outputs=outputs, **kwargs)
        return [result.as_numpy(n) for n in names]

    def close(self) -> None:
        self.client.close()
