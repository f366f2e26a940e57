"""A thin common view of numpy arrays and torch tensors.

The binding never copies user data: it passes raw addresses to C. So every
property the C side relies on (dtype, shape, C-contiguity, memory space) is
checked here first and reported as TypeError/ValueError naming the argument,
before any C call. torch is imported only if a tensor is actually passed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import numpy as np

try:  # optional: a real bfloat16 numpy dtype
    import ml_dtypes as _ml_dtypes

    NP_BFLOAT16: Optional[np.dtype] = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - depends on the environment
    NP_BFLOAT16 = None

# Canonical names of the data dtypes the library supports (disco_dtype_t).
DTYPE_ALIASES = {
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}
ELEM_SIZE = {"bfloat16": 2, "float16": 2, "float32": 4}

# Memory alignment of every buffer the binding allocates; the library needs
# 16 bytes for rows, more costs nothing and suits vector loads.
ALIGNMENT = 64


def canonical_dtype(dtype: Any) -> str:
    """'bf16', 'bfloat16', np.float32, torch.float16 ... -> canonical name."""
    if isinstance(dtype, str):
        key = dtype.lower()
    elif type(dtype).__module__ == "torch":
        key = str(dtype).replace("torch.", "")
    else:
        try:
            key = np.dtype(dtype).name
        except TypeError:
            key = str(dtype)
    if key not in DTYPE_ALIASES:
        raise ValueError(f"disco: unsupported dtype {dtype!r}; supported: bfloat16, "
                         f"float16, float32 (float64 is not supported by the library)")
    return DTYPE_ALIASES[key]


def _torch():
    """The torch module if it is already imported (a tensor can only exist
    if it is), else None: never import torch just to inspect an argument."""
    return sys.modules.get("torch")


def is_torch(obj: Any) -> bool:
    t = _torch()
    return t is not None and isinstance(obj, t.Tensor)


@dataclass
class ArrayInfo:
    """What the binding needs to know about one argument."""

    framework: str          # "numpy" or "torch"
    dtype: str              # numpy-style name: float32, bfloat16, uint16, int64 ...
    shape: Tuple[int, ...]
    contiguous: bool
    device: str             # "cpu" or "cuda:N"
    ptr: int


def _torch_dtype_name(dt: Any) -> str:
    return str(dt).replace("torch.", "")


def inspect(obj: Any, name: str) -> ArrayInfo:
    """Describe a numpy array or torch tensor; TypeError for anything else."""
    if isinstance(obj, np.ndarray):
        return ArrayInfo("numpy", obj.dtype.name, tuple(obj.shape),
                         bool(obj.flags["C_CONTIGUOUS"]), "cpu",
                         int(obj.__array_interface__["data"][0]))
    if is_torch(obj):
        dev = obj.device
        device = "cpu" if dev.type == "cpu" else f"{dev.type}:{dev.index}"
        return ArrayInfo("torch", _torch_dtype_name(obj.dtype), tuple(obj.shape),
                         bool(obj.is_contiguous()), device, int(obj.data_ptr()))
    raise TypeError(f"disco: {name} must be a numpy.ndarray or torch.Tensor, "
                    f"got {type(obj).__name__}")


def accepted_data_dtypes(config_dtype: str, framework: str) -> Tuple[str, ...]:
    """Element types accepted for token data of a comm with `config_dtype`.
    bf16 on numpy: ml_dtypes.bfloat16 or its raw bits as uint16."""
    if config_dtype == "bfloat16" and framework == "numpy":
        return ("bfloat16", "uint16")
    return (config_dtype,)


def check_array(obj: Any, name: str, dtypes: Sequence[str], shape: Sequence[Optional[int]],
                device: str, framework: Optional[str] = None) -> ArrayInfo:
    """Validate an argument; shape entries of None match any size."""
    info = inspect(obj, name)
    if framework is not None and info.framework != framework:
        raise TypeError(f"disco: {name} is a {info.framework} array but the other "
                        f"arguments are {framework}; do not mix them")
    if info.dtype not in dtypes:
        raise TypeError(f"disco: {name} has dtype {info.dtype}, expected "
                        + " or ".join(dtypes))
    if len(info.shape) != len(shape) or any(
            want is not None and got != want for got, want in zip(info.shape, shape)):
        want_s = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"disco: {name} has shape {list(info.shape)}, expected {want_s}")
    if info.device != device:
        raise ValueError(f"disco: {name} is on {info.device} but this communicator "
                         f"needs {device} memory")
    if not info.contiguous:
        raise ValueError(f"disco: {name} must be C-contiguous (row-major, dense); "
                         f"call .contiguous() / numpy.ascontiguousarray first")
    return info


def empty(framework: str, shape: Sequence[int], dtype: str, device: str) -> Any:
    """An uninitialised, ALIGNMENT-aligned array of numpy-style `dtype`."""
    if framework == "torch":
        torch = _torch()
        return torch.empty(tuple(shape), dtype=getattr(torch, dtype), device=device)
    np_dtype = NP_BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * np_dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    offset = (-raw.ctypes.data) % ALIGNMENT
    return raw[offset:offset + nbytes].view(np_dtype).reshape(tuple(shape))


def zeros(framework: str, shape: Sequence[int], dtype: str, device: str) -> Any:
    arr = empty(framework, shape, dtype, device)
    if framework == "torch":
        arr.zero_()
    else:
        arr.fill(0)
    return arr


def ptr_or_none(info: ArrayInfo) -> Optional[int]:
    """NULL for empty arrays: the library allows NULL exactly when there are
    no rows, and an empty array's address may be arbitrary (unaligned)."""
    if 0 in info.shape:
        return None
    return info.ptr
