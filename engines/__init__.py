"""Inference backends and the shipped model bundles.

``engines`` knows nothing of DICOM or HL7: it loads bundles (a JSON card plus,
for learned models, ONNX networks) and runs them on numpy arrays.
"""
from engines.bundle import BundleError, ModelBundle, ModelCard, load_bundle
from engines.runtime import Engine, EngineError, available_backends, load, load_graph

__all__ = ["BundleError", "Engine", "EngineError", "ModelBundle", "ModelCard", "available_backends", "load",
           "load_bundle", "load_graph"]
