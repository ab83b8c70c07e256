"""What NVIDIA GPU this process can use, asked of the CUDA driver directly.

``ctypes`` over ``libcuda.so.1`` costs microseconds and needs no framework: importing
torch only to learn that there is no GPU would add seconds to every start-up, and the
TensorRT cache key needs the GPU's name and compute capability before anything is built.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str  # "9.0"


@functools.lru_cache(maxsize=1)
def cuda_gpus() -> tuple[GpuInfo, ...]:
    """The CUDA devices the driver reports (empty without a driver or a GPU)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return ()
    try:
        if lib.cuInit(0) != 0:
            return ()
        count = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return ()
        out = []
        for i in range(count.value):
            dev = ctypes.c_int(0)
            if lib.cuDeviceGet(ctypes.byref(dev), i) != 0:
                continue
            name = ctypes.create_string_buffer(256)
            lib.cuDeviceGetName(name, 256, dev)
            major, minor = ctypes.c_int(0), ctypes.c_int(0)
            lib.cuDeviceGetAttribute(ctypes.byref(major), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
            lib.cuDeviceGetAttribute(ctypes.byref(minor), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
            out.append(GpuInfo(i, name.value.decode(errors="replace"), f"{major.value}.{minor.value}"))
        return tuple(out)
    except AttributeError:  # a libcuda without the driver API entry points: treat as no GPU
        return ()


def has_cuda_gpu() -> bool:
    return bool(cuda_gpus())
