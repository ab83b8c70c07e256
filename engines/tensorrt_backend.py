"""TensorRT on the local GPU: build from the bundle's ONNX once, cache the plan, run on a CUDA stream.

- one optimisation profile per input: batch 1 .. ``max_batch``, tuned for ``opt_batch``
  (the other dimensions are the ONNX file's, which are static for every shipped network);
  a larger call runs in chunks of ``max_batch``, so a 1,000-slice volume is still one call;
- FP16 where the model card allows it and the precision setting asks for it;
- plans cached by engines.engine_cache (GPU + compute capability + TensorRT version +
  ONNX hash + precision + profile; the hash is the one checked against the model card, and the parser
  gets the very bytes that were checked); ``osteoscreen engines build`` fills the cache at install;
- inputs staged in page-locked host buffers and copied asynchronously on the session's own
  stream; buffers grow on demand and are reused between calls.

Needs the ``tensorrt`` extra (``pip install .[tensorrt]``: the tensorrt and cuda-python
packages) and an NVIDIA GPU.
"""
from __future__ import annotations

import json
import logging
import math
import numpy as np

from engines import engine_cache
from engines.batching import run_in_chunks
from engines.bundle import VerifiedFile
from engines.cuda_staging import CudaStaging
from engines.gpu import cuda_gpus
from engines.options import EngineOptions

log = logging.getLogger("osteoscreen.engines")


def profile_for(input_shapes: dict[str, tuple[int | None, ...]], opt_batch: int, max_batch: int,
                ) -> dict[str, list[list[int]]]:
    """(min, opt, max) shapes per input: the leading (batch) dimension varies, the rest are fixed."""
    out = {}
    for name, shape in input_shapes.items():
        rest = list(shape[1:])
        if any(d is None for d in rest):
            raise ValueError(f"input {name} has a dynamic non-batch dimension {shape}: not supported")
        out[name] = [[1, *rest], [opt_batch, *rest], [max_batch, *rest]]
    return out


def build_plan(onnx: bytes, name: str, profile: dict[str, list[list[int]]], fp16: bool) -> bytes:
    """``onnx``: the network's bytes, as engines.bundle.read_verified checked them; ``name`` for messages."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {name}: {errors}")
    config = builder.create_builder_config()
    prof = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        prof.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
    config.add_optimization_profile(prof)
    if fp16:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise RuntimeError(f"TensorRT {trt.__version__} builds strongly typed networks only: "
                               "set [engines] precision = \"fp32\"")
        config.set_flag(trt.BuilderFlag.FP16)
    elif hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 would round matmul inputs to 10 bits
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build {name} (see the TensorRT log above)")
    return bytes(plan)


class TensorRTSession:
    def __init__(self, onnx: VerifiedFile, *, graph: str, fp16: bool, options: EngineOptions,
                 input_shapes: dict[str, tuple[int | None, ...]]) -> None:
        import tensorrt as trt

        gpus = cuda_gpus()
        if not gpus:
            raise RuntimeError("TensorRT needs an NVIDIA GPU and driver; none found")
        self.max_batch = options.max_batch
        self.profile = profile_for(input_shapes, options.opt_batch, options.max_batch)
        precision = "fp16" if fp16 else "fp32"
        self.key = engine_cache.CacheKey(
            gpu_name=gpus[0].name, compute_capability=gpus[0].compute_capability,
            runtime_version=f"tensorrt {trt.__version__}", onnx_sha256=onnx.sha256,
            precision=precision, profile=json.dumps(self.profile, sort_keys=True))
        self.cache_path = engine_cache.entry_path(options.cache_dir, graph, self.key)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        plan = engine_cache.load(self.cache_path, self.key)
        engine = self._runtime.deserialize_cuda_engine(plan) if plan else None
        self.built = engine is None
        if engine is None:
            if plan is not None:
                log.warning("engine cache %s would not deserialize: rebuilding", self.cache_path)
            log.info("building TensorRT %s engine for %s (once; cached in %s)", precision, graph, self.cache_path)
            plan = build_plan(onnx.data, onnx.path.name, self.profile, fp16)
            engine_cache.store(self.cache_path, self.key, plan)
            engine = self._runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise RuntimeError(f"TensorRT could not load the engine it just built for {graph}")
        self.engine = engine
        self.context = engine.create_execution_context()
        self.staging = CudaStaging()

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return run_in_chunks(self._run_chunk, names, feeds, self.max_batch)

    def _run_chunk(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        st = self.staging
        for name, arr in feeds.items():
            self.context.set_input_shape(name, tuple(arr.shape))
            self.context.set_tensor_address(name, st.upload(name, arr))
        shapes = []
        for name in names:
            shape = tuple(self.context.get_tensor_shape(name))
            self.context.set_tensor_address(name, st.device_ptr(name, 4 * math.prod(shape)))
            shapes.append(shape)
        if not self.context.execute_async_v3(st.stream_handle):
            raise RuntimeError("TensorRT execution failed (see the TensorRT log)")
        for name, shape in zip(names, shapes):
            st.queue_download(name, 4 * math.prod(shape))
        st.sync()
        return [st.host_array(name, shape) for name, shape in zip(names, shapes)]

    def close(self) -> None:
        if getattr(self, "staging", None) is not None:
            self.staging.close()
            self.staging = None
