"""Bootstrap of an NCCL communicator for Comm.from_torch, through ctypes.

torch does not expose its ncclComm_t, so a dedicated one is made: rank 0
of the group calls ncclGetUniqueId, the id travels with
torch.distributed.broadcast_object_list, and every rank calls
ncclCommInitRank on its current CUDA device. The libnccl used is the copy
already in the process (the one libdisco and torch were bound to), so the
ncclComm_t handed to disco_comm_create_nccl comes from the same library
that will drive it.
"""

from __future__ import annotations

import ctypes
import os
from ctypes import POINTER, byref, c_char, c_char_p, c_int, c_void_p
from typing import Any, Callable, Optional, Tuple

from . import _lib
from ._errors import DiscoError, check


class NcclUniqueId(ctypes.Structure):
    """ncclUniqueId: 128 opaque bytes, passed by value to ncclCommInitRank."""

    _fields_ = [("internal", c_char * 128)]


_nccl: Optional[ctypes.CDLL] = None


def _candidates() -> list:
    env = os.environ.get("DISCO_NCCL_LIBRARY")
    names = [env] if env else []
    names.append("libnccl.so.2")
    try:  # NCCL of the pip wheels (nvidia-nccl-cu*), as torch uses it
        import nvidia.nccl  # type: ignore

        for base in getattr(nvidia.nccl, "__path__", []):
            names.append(os.path.join(base, "lib", "libnccl.so.2"))
    except ImportError:
        pass
    return names


def load_nccl() -> ctypes.CDLL:
    """The process's libnccl with the few symbols used here declared."""
    global _nccl
    if _nccl is not None:
        return _nccl
    lib = None
    try:  # already loaded (by libdisco or torch): use that very copy
        lib = ctypes.CDLL("libnccl.so.2", mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
    except OSError:
        errors = []
        for name in _candidates():
            try:
                lib = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
                break
            except OSError as e:
                errors.append(f"{name}: {e}")
        if lib is None:
            raise RuntimeError("disco: libnccl.so.2 not found (set DISCO_NCCL_LIBRARY): "
                               + "; ".join(errors))
    lib.ncclGetUniqueId.argtypes = [POINTER(NcclUniqueId)]
    lib.ncclGetUniqueId.restype = c_int
    lib.ncclCommInitRank.argtypes = [POINTER(c_void_p), c_int, NcclUniqueId, c_int]
    lib.ncclCommInitRank.restype = c_int
    lib.ncclCommDestroy.argtypes = [c_void_p]
    lib.ncclCommDestroy.restype = c_int
    lib.ncclCommAbort.argtypes = [c_void_p]
    lib.ncclCommAbort.restype = c_int
    lib.ncclGetErrorString.argtypes = [c_int]
    lib.ncclGetErrorString.restype = c_char_p
    _nccl = lib
    return lib


def _nccl_check(lib: ctypes.CDLL, rc: int, what: str) -> None:
    if rc != 0:
        msg = (lib.ncclGetErrorString(rc) or b"").decode()
        raise DiscoError(15, "DISCO_ERR_BACKEND", f"{what} failed: NCCL error {rc} ({msg})", what)


def create_from_torch(group: Any, cfg: _lib.Config, device: Any,
                      backend: str = "nccl") -> Tuple[int, str, Callable[[bool], None]]:
    """Collective over `group`. Returns (disco comm pointer, device string,
    finaliser for the owned ncclComm_t). backend: "nccl" or "nccl_device"."""
    import torch
    import torch.distributed as dist

    if backend not in ("nccl", "nccl_device"):
        raise ValueError(f"disco: backend must be 'nccl' or 'nccl_device', got {backend!r}")
    create = "disco_comm_create_" + backend
    if not _lib.has_symbol(create):
        raise DiscoError(17, "DISCO_ERR_NOT_SUPPORTED",
                         f"{_lib.lib_path()} was built without the NCCL backend "
                         "(configure with CUDA and NCCL, DISCO_WITH_NCCL=ON)",
                         create)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("disco: Comm.from_torch needs torch.distributed initialised "
                           "(torch.distributed.init_process_group)")
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None \
        else torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"disco: Comm.from_torch needs a CUDA device, got {dev}")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(dev)  # ncclCommInitRank binds the current device

    rank = dist.get_rank(group)
    world = dist.get_world_size(group)
    nccl = load_nccl()
    uid = NcclUniqueId()
    payload = [None]
    if rank == 0:
        _nccl_check(nccl, nccl.ncclGetUniqueId(byref(uid)), "ncclGetUniqueId")
        payload = [bytes(uid.internal.raw if hasattr(uid.internal, "raw")
                         else ctypes.string_at(ctypes.addressof(uid), 128))]
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast_object_list(payload, src=src, group=group)
    ctypes.memmove(ctypes.addressof(uid), payload[0], 128)

    ncomm = c_void_p()
    _nccl_check(nccl, nccl.ncclCommInitRank(byref(ncomm), world, uid, rank), "ncclCommInitRank")
    out = c_void_p()
    rc = getattr(_lib.lib(), create)(ncomm, byref(cfg), byref(out))
    if rc != 0:
        try:
            check(rc, create)
        finally:
            nccl.ncclCommDestroy(ncomm)

    nccl_ptr = ncomm.value

    def on_destroy(explicit: bool) -> None:
        # close(): a normal destroy. GC / interpreter exit: abort, which is
        # purely local and never waits for peers that may already be gone.
        (nccl.ncclCommDestroy if explicit else nccl.ncclCommAbort)(nccl_ptr)

    return out.value, f"cuda:{dev.index}", on_destroy
