"""disco: Mixture-of-Experts dispatch and combine (ctypes binding).

    import disco
    comms = disco.local_group(4, num_experts=8, top_k=2, hidden=64, max_tokens=128)
    def step(rank, comm):
        res = comm.dispatch(x[rank], idx[rank], w[rank])
        return comm.combine(res.x, res)          # identity experts
    outs = disco.run_ranks(comms, step)

Arrays are numpy arrays (host backends) or torch tensors (CPU on host
backends, CUDA with Comm.from_torch). ``disco.torch`` adds autograd.

The shared library is found via $DISCO_LIBRARY, next to this package, the
repository's build*/ directories, then the system loader; its version must
match this package's major.minor (checked at import).
"""

from __future__ import annotations

from . import _lib
from ._errors import DiscoError
from ._lib import __version__

_lib.load()  # fail at import, with a clear message, if the library is unusable

from .comm import Comm, DispatchResult, Handle, local_group, run_ranks  # noqa: E402

__all__ = ["Comm", "DiscoError", "DispatchResult", "Handle", "local_group", "run_ranks",
           "library_path", "library_version", "__version__"]


def library_path() -> str:
    """Path of the loaded libdisco."""
    return _lib.lib_path() or ""


def library_version() -> str:
    """Version of the loaded libdisco as 'major.minor.patch'."""
    v = _lib.lib().disco_get_version()
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}"


def __getattr__(name: str):
    # `disco.torch` is imported on first use so that numpy-only users never
    # import torch.
    if name == "torch":
        import importlib

        return importlib.import_module(".torch", __name__)
    raise AttributeError(f"module 'disco' has no attribute {name!r}")
