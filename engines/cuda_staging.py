"""Page-locked host buffers, device buffers and one CUDA stream: the copies around a GPU engine.

Each named tensor gets a pinned host buffer and a device buffer, grown on demand and reused
between calls; copies are asynchronous on the session's own stream, and ``sync`` waits for
it. Uses cuda-python (``cuda.bindings.runtime``), the CUDA runtime's own Python binding.
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import numpy as np


def cudart():
    try:
        from cuda.bindings import runtime as rt  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart as rt  # type: ignore[no-redef]  # older cuda-python
    return rt


def check(result):
    """cuda-python returns (error, *values): raise on an error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA runtime error {err}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


@dataclass
class _Buffer:
    device: int
    host: int
    capacity: int


class CudaStaging:
    def __init__(self) -> None:
        self.rt = cudart()
        self.stream = check(self.rt.cudaStreamCreate())
        self._buffers: dict[str, _Buffer] = {}

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def device_ptr(self, name: str, nbytes: int) -> int:
        """Device address of ``name``'s buffer, at least ``nbytes`` long."""
        buf = self._buffers.get(name)
        if buf is None or buf.capacity < nbytes:
            if buf is not None:
                self._free(buf)
            cap = max(nbytes, 1 << 12)
            buf = _Buffer(device=int(check(self.rt.cudaMalloc(cap))), host=int(check(self.rt.cudaMallocHost(cap))),
                          capacity=cap)
            self._buffers[name] = buf
        return buf.device

    def upload(self, name: str, arr: np.ndarray) -> int:
        """Stage ``arr`` in pinned memory and queue its copy to the device; returns the device address."""
        arr = np.ascontiguousarray(arr)
        dev = self.device_ptr(name, arr.nbytes)
        host = self._buffers[name].host
        ctypes.memmove(host, arr.ctypes.data, arr.nbytes)
        check(self.rt.cudaMemcpyAsync(dev, host, arr.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                      self.stream))
        return dev

    def queue_download(self, name: str, nbytes: int) -> None:
        buf = self._buffers[name]
        check(self.rt.cudaMemcpyAsync(buf.host, buf.device, nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                                      self.stream))

    def sync(self) -> None:
        check(self.rt.cudaStreamSynchronize(self.stream))

    def host_array(self, name: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        """A copy of what the last download of ``name`` brought back (call after ``sync``)."""
        n = math.prod(shape) * np.dtype(dtype).itemsize
        raw = (ctypes.c_uint8 * n).from_address(self._buffers[name].host)
        return np.frombuffer(raw, dtype=dtype, count=math.prod(shape)).reshape(shape).copy()

    def _free(self, buf: _Buffer) -> None:
        self.rt.cudaFree(buf.device)
        self.rt.cudaFreeHost(buf.host)

    def close(self) -> None:
        for buf in self._buffers.values():
            self._free(buf)
        self._buffers.clear()
        if self.stream is not None:
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None
