"""Loading libdisco.so and declaring its C API for ctypes.

Everything that knows the C ABI lives here: the struct mirrors of disco.h,
the argtypes/restype of every symbol, and the version check. The rest of the
package only calls ``lib().disco_*`` with these declarations, so a header
change is a one-file change here (and tests/python/test_abi.py compares the
mirrors against the real header with a C compiler).
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import sys
import threading
from ctypes import (POINTER, c_char_p, c_int, c_int32, c_int64, c_size_t,
                    c_uint32, c_void_p)
from typing import List, Optional

# Version of the Python package. disco_get_version() of the loaded library
# must have the same major and minor number (patch may differ: patch releases
# never change the ABI).
VERSION_MAJOR = 0
VERSION_MINOR = 1
VERSION_PATCH = 0
__version__ = f"{VERSION_MAJOR}.{VERSION_MINOR}.{VERSION_PATCH}"

# ---- constants mirrored from disco.h ----------------------------------------
STRUCT_VERSION = 1
CONFIG_MAGIC = 0x44434647
DISPATCH_ARGS_MAGIC = 0x44445350
COMBINE_ARGS_MAGIC = 0x44434D42
DISPATCH_REUSE_LAYOUT = 0x1
MAX_TOP_K = 64

DTYPE_BF16, DTYPE_FP16, DTYPE_FP32 = 0, 1, 2
INDEX_INT64, INDEX_INT32 = 0, 1
LAYOUT_EXPERT_MAJOR, LAYOUT_RANK_MAJOR = 0, 1
COMBINE_WIRE_FP32, COMBINE_WIRE_DTYPE = 0, 1

# C enums are `int` on every ABI disco supports.
c_enum = c_int


class Config(ctypes.Structure):
    """Mirror of disco_config_t; construct with :func:`config_init`."""

    _fields_ = [
        ("size", c_size_t),
        ("magic", c_uint32),
        ("version", c_uint32),
        ("num_experts", c_int32),
        ("top_k", c_int32),
        ("hidden", c_int64),
        ("max_tokens", c_int64),
        ("dtype", c_enum),
        ("timeout_ms", c_int32),
        ("max_sms", c_int32),
        ("combine_wire", c_enum),
    ]


class DispatchArgs(ctypes.Structure):
    """Mirror of disco_dispatch_args_t. Pointers are c_void_p (same ABI as
    the typed pointers of the header) because they may be device addresses."""

    _fields_ = [
        ("size", c_size_t),
        ("magic", c_uint32),
        ("version", c_uint32),
        ("x", c_void_p),
        ("topk_idx", c_void_p),
        ("index_type", c_enum),
        ("topk_weights", c_void_p),
        ("num_tokens", c_int64),
        ("layout", c_enum),
        ("expert_alignment", c_int32),
        ("flags", c_uint32),
        ("stream", c_void_p),
        ("recv_capacity", c_int64),
        ("recv_x", c_void_p),
        ("recv_src_rank", c_void_p),
        ("recv_src_token", c_void_p),
        ("recv_expert", c_void_p),
        ("recv_weight", c_void_p),
        ("n_tokens_to_rank", c_void_p),
        ("n_tokens_from_rank", c_void_p),
        ("tokens_per_expert", c_void_p),
        ("num_recv_rows", c_void_p),
    ]


class CombineArgs(ctypes.Structure):
    """Mirror of disco_combine_args_t."""

    _fields_ = [
        ("size", c_size_t),
        ("magic", c_uint32),
        ("version", c_uint32),
        ("y", c_void_p),
        ("y_rows", c_int64),
        ("out", c_void_p),
        ("weighted", c_int32),
        ("stream", c_void_p),
    ]


def config_init() -> Config:
    """Equivalent of DISCO_CONFIG_INIT."""
    return Config(ctypes.sizeof(Config), CONFIG_MAGIC, STRUCT_VERSION, 0, 0, 0, 0,
                  DTYPE_BF16, 0, 0, COMBINE_WIRE_FP32)


def dispatch_args_init() -> DispatchArgs:
    """Equivalent of DISCO_DISPATCH_ARGS_INIT (NULL pointers, alignment 1)."""
    args = DispatchArgs()
    args.size = ctypes.sizeof(DispatchArgs)
    args.magic = DISPATCH_ARGS_MAGIC
    args.version = STRUCT_VERSION
    args.index_type = INDEX_INT64
    args.layout = LAYOUT_EXPERT_MAJOR
    args.expert_alignment = 1
    return args


def combine_args_init() -> CombineArgs:
    """Equivalent of DISCO_COMBINE_ARGS_INIT."""
    return CombineArgs(ctypes.sizeof(CombineArgs), COMBINE_ARGS_MAGIC,
                       STRUCT_VERSION, None, -1, None, 1, None)


# Result codes (DISCO_RESULT_LIST). Kept here so that an error can be named
# even when it comes from a library too old to know the name.
RESULT_NAMES = [
    "DISCO_SUCCESS", "DISCO_ERR_INVALID_ARGUMENT", "DISCO_ERR_NULL_POINTER",
    "DISCO_ERR_MISALIGNED", "DISCO_ERR_BAD_STRUCT",
    "DISCO_ERR_EXPERT_OUT_OF_RANGE", "DISCO_ERR_DUPLICATE_EXPERT",
    "DISCO_ERR_TOO_MANY_TOKENS", "DISCO_ERR_EXPERT_DIVISIBILITY",
    "DISCO_ERR_HIDDEN_ALIGNMENT", "DISCO_ERR_CAPACITY",
    "DISCO_ERR_INVALID_USAGE", "DISCO_ERR_OUT_OF_MEMORY", "DISCO_ERR_TIMEOUT",
    "DISCO_ERR_REMOTE", "DISCO_ERR_BACKEND", "DISCO_ERR_CUDA",
    "DISCO_ERR_NOT_SUPPORTED", "DISCO_ERR_INTERNAL",
]

# (name, restype, argtypes) of every symbol the package uses.
_SIGNATURES = [
    ("disco_get_version", c_int, []),
    ("disco_result_string", c_char_p, [c_enum]),
    ("disco_result_name", c_char_p, [c_enum]),
    ("disco_last_error", c_char_p, []),
    ("disco_comm_create_local", c_enum, [c_int, POINTER(Config), POINTER(c_void_p)]),
    ("disco_comm_destroy", None, [c_void_p]),
    ("disco_comm_rank", c_int, [c_void_p]),
    ("disco_comm_size", c_int, [c_void_p]),
    ("disco_comm_num_local_experts", c_int, [c_void_p]),
    ("disco_comm_backend", c_char_p, [c_void_p]),
    ("disco_comm_get_config", c_enum, [c_void_p, POINTER(Config)]),
    ("disco_comm_uses_device_memory", c_int, [c_void_p]),
    ("disco_handle_create", c_enum, [c_void_p, POINTER(c_void_p)]),
    ("disco_handle_destroy", None, [c_void_p]),
    ("disco_handle_num_recv_rows", c_enum, [c_void_p, POINTER(c_int64)]),
    ("disco_dispatch_layout", c_enum,
     [c_void_p, c_void_p, POINTER(DispatchArgs), POINTER(c_int64)]),
    ("disco_dispatch", c_enum, [c_void_p, c_void_p, POINTER(DispatchArgs)]),
    ("disco_combine", c_enum, [c_void_p, c_void_p, POINTER(CombineArgs)]),
    ("disco_comm_caps", ctypes.c_uint32, [c_void_p]),
    ("disco_comm_max_recv_rows", c_enum, [c_void_p, c_int, ctypes.c_int32, POINTER(c_int64)]),
    ("disco_comm_check", c_enum, [c_void_p, ctypes.c_int32]),
]
# Present only in builds with the backend (disco_nccl.h, disco_mpi.h).
_OPTIONAL_SIGNATURES = [
    ("disco_comm_create_nccl", c_enum, [c_void_p, POINTER(Config), POINTER(c_void_p)]),
    ("disco_comm_create_nccl_device", c_enum, [c_void_p, POINTER(Config), POINTER(c_void_p)]),
]


def _repo_root() -> str:
    # python/disco/_lib.py -> repository root
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _is_sanitized_build(build_dir: str) -> bool:
    """A library built with ASan/TSan cannot be dlopen()ed by a normal Python
    (the sanitizer runtime must come first and aborts the process otherwise),
    so such build directories are skipped by the search."""
    cache = os.path.join(build_dir, "CMakeCache.txt")
    try:
        with open(cache, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("DISCO_SANITIZE:"):
                    return line.split("=", 1)[1].strip() != ""
    except OSError:
        pass
    return False


def candidate_paths() -> List[str]:
    """Where the library is looked for, in order: $DISCO_LIBRARY, next to the
    package, the repository's build*/ directories (most recently built
    first, sanitizer builds skipped), then the system loader's search."""
    env = os.environ.get("DISCO_LIBRARY")
    if env:
        # An explicit choice is never second-guessed by a fallback.
        return [env]
    here = os.path.dirname(os.path.abspath(__file__))
    paths = sorted(glob.glob(os.path.join(here, "libdisco.so*")))
    builds = []
    for d in glob.glob(os.path.join(_repo_root(), "build*")):
        lib_path = os.path.join(d, "libdisco.so")
        if os.path.isfile(lib_path) and not _is_sanitized_build(d):
            builds.append(lib_path)
    builds.sort(key=os.path.getmtime, reverse=True)
    paths += builds
    paths += ["libdisco.so.0", "libdisco.so"]
    return paths


def check_version(lib_version: int, where: str) -> None:
    """Raise ImportError unless the library's major.minor equals the
    package's: the ctypes struct mirrors are only valid for that ABI."""
    major, minor, patch = lib_version // 10000, lib_version // 100 % 100, lib_version % 100
    if (major, minor) != (VERSION_MAJOR, VERSION_MINOR):
        raise ImportError(
            f"disco: the library {where} is version {major}.{minor}.{patch} but "
            f"this Python package is {__version__}; they must have the same "
            f"major.minor version. Point DISCO_LIBRARY at a matching libdisco.so.")


def _declare(cdll: ctypes.CDLL) -> None:
    for name, restype, argtypes in _SIGNATURES:
        fn = getattr(cdll, name)  # AttributeError -> reported by load()
        fn.restype = restype
        fn.argtypes = argtypes
    for name, restype, argtypes in _OPTIONAL_SIGNATURES:
        fn = getattr(cdll, name, None)
        if fn is not None:
            fn.restype = restype
            fn.argtypes = argtypes


_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_lib_path: Optional[str] = None


def _load_torch_nccl_first() -> None:
    """Import torch (if installed) before libdisco pulls in libnccl.so.2.

    A process keeps the first libnccl.so.2 it loads. If libdisco's came first,
    a torch built against a newer NCCL fails to import (undefined NCCL
    symbols); with torch's first, libdisco and torch.distributed share one
    NCCL, which Comm.from_torch needs anyway (the host API is stable across
    2.28.x). Set DISCO_NO_TORCH_PRELOAD=1 to skip.
    """
    if os.environ.get("DISCO_NO_TORCH_PRELOAD") or "torch" in sys.modules:
        return
    if importlib.util.find_spec("torch") is None:
        return
    try:
        import torch  # noqa: F401
    except Exception:  # a broken torch must not break the numpy binding
        pass


def load() -> ctypes.CDLL:
    """Load, declare and version-check libdisco once per process."""
    global _lib, _lib_path
    with _lock:
        if _lib is not None:
            return _lib
        _load_torch_nccl_first()
        errors = []
        for path in candidate_paths():
            try:
                # RTLD_GLOBAL so that a backend library loaded later (libnccl
                # through ctypes) and libdisco resolve to the same copy.
                cdll = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as e:
                errors.append(f"  {path}: {e}")
                continue
            try:
                _declare(cdll)
            except AttributeError as e:
                raise ImportError(f"disco: {path} is not a usable libdisco: {e}") from e
            check_version(cdll.disco_get_version(), f"at {path}")
            _lib, _lib_path = cdll, path
            return cdll
        raise ImportError(
            "disco: libdisco.so not found. Build it (cmake -S . -B build && "
            "cmake --build build) or set DISCO_LIBRARY to its path. Tried:\n"
            + "\n".join(errors))


def lib() -> ctypes.CDLL:
    """The loaded library (loads it on first use)."""
    return _lib if _lib is not None else load()


def lib_path() -> Optional[str]:
    """Path the library was loaded from (None before loading)."""
    return _lib_path


def has_symbol(name: str) -> bool:
    return getattr(lib(), name, None) is not None
