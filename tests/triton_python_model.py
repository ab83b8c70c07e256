"""Triton Python-backend model used by tests/test_triton.py: serves one exported ONNX file with ONNX Runtime.

The test server (from the nvidia-pytriton wheel) has no ONNX Runtime backend, only the Python
one; this model stands in for it so that the exported configuration (names, shapes, batching)
and the node's Triton client are exercised against a real server. The test writes the path of
the environment holding numpy and onnxruntime into the first line.
"""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        self.inputs = [i["name"] for i in cfg["input"]]
        self.outputs = [o["name"] for o in cfg["output"]]
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
            results = self.session.run(self.outputs, feeds)
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(n, r.astype(np.float32)) for n, r in zip(self.outputs, results)]))
        return responses
