"""Inference backends and the shipped model bundles.

``engines`` knows nothing of DICOM or HL7: it loads bundles (a JSON card plus,
for learned models, ONNX networks and their TorchScript reference) and runs them on
numpy arrays through TensorRT, ONNX Runtime, PyTorch or a Triton server.
"""
from engines.bundle import BundleError, ModelBundle, ModelCard, load_bundle
from engines.options import EngineOptions, configure
from engines.runtime import BACKENDS, Engine, EngineError, available_backends, load, load_graph

__all__ = ["BACKENDS", "BundleError", "Engine", "EngineError", "EngineOptions", "ModelBundle", "ModelCard",
           "available_backends", "configure", "load", "load_bundle", "load_graph"]
