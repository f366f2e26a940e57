"""Communicator, handle and the dispatch/combine calls.

Lifetime rules (why the bookkeeping below exists):
- A C handle must be destroyed before its comm. Every live C handle of a
  comm is recorded in the comm's _CommState; destroying the comm destroys
  them first, whatever order the garbage collector finalises objects in.
- disco_comm_destroy is local (not collective), so closing at garbage
  collection or interpreter exit never waits for peers. Finalisers never block:
  a handle released by the GC goes to a free list (reused by the next
  dispatch, freed at close), and a comm finaliser that finds its comm in use by
  another thread leaks it rather than waiting. Hence no hang at exit.
- The C API wants a comm used by one thread at a time; an RLock per comm
  enforces that for calls made through this package.
"""

from __future__ import annotations

import threading
import weakref
from ctypes import byref, c_int64, c_void_p
from typing import Any, Callable, List, Optional, Sequence, Union

from . import _arrays, _lib
from ._errors import DiscoError, check

_LAYOUTS = {"expert_major": _lib.LAYOUT_EXPERT_MAJOR, "rank_major": _lib.LAYOUT_RANK_MAJOR}
_WIRES = {"fp32": _lib.COMBINE_WIRE_FP32, "dtype": _lib.COMBINE_WIRE_DTYPE}
_DTYPE_ENUM = {"bfloat16": _lib.DTYPE_BF16, "float16": _lib.DTYPE_FP16,
               "float32": _lib.DTYPE_FP32}
_ENUM_DTYPE = {v: k for k, v in _DTYPE_ENUM.items()}
_MAX_FREE_HANDLES = 8


class _CommState:
    """Everything a finaliser needs, without a reference to the Comm itself."""

    def __init__(self, ptr: int):
        self.ptr: Optional[int] = ptr
        self.lock = threading.RLock()
        self.handles: set = set()   # every C handle of this comm not yet destroyed
        self.free: List[int] = []   # released handles, reusable
        # Called after disco_comm_destroy with explicit=True for close() and
        # False for GC/exit (the nccl backend frees its ncclComm_t there).
        self.on_destroy: Optional[Callable[[bool], None]] = None
        # A call timed out: the transport (NCCL) may be stuck in a collective,
        # so close() must abort it instead of a normal destroy.
        self.broken = False


def _destroy_comm(state: _CommState, explicit: bool) -> None:
    if state.ptr is None:
        return
    if not state.lock.acquire(blocking=explicit):
        return  # in use by another thread at GC/exit: leak rather than hang
    try:
        if state.ptr is None:
            return
        lib = _lib.lib()
        for h in list(state.handles):
            lib.disco_handle_destroy(h)
        state.handles.clear()
        state.free.clear()
        lib.disco_comm_destroy(state.ptr)
        state.ptr = None
        if state.on_destroy is not None:
            state.on_destroy(explicit and not state.broken)
    finally:
        state.lock.release()


def _release_handle(state: _CommState, ptr: int) -> None:
    # Any thread, possibly inside the GC: no C call, no lock.
    if state.ptr is not None:
        state.free.append(ptr)


class Handle:
    """One dispatch's routing plan (disco_handle_t), needed by combine.

    Each DispatchResult owns one; released handles are recycled by the comm,
    so steady-state training allocates none. Passing ``handle=`` to
    Comm.dispatch reuses a specific one (its earlier results become stale).
    """

    def __init__(self, comm: "Comm", ptr: int):
        self.comm = comm
        self._ptr: Optional[int] = ptr
        self.generation = 0
        self.num_rows: Optional[int] = None
        self.num_tokens = 0
        self.layout = "expert_major"
        self.x_dtype = ""        # numpy/torch dtype name of the dispatched x
        self.framework = ""      # "numpy" or "torch"
        self._finalizer = weakref.finalize(self, _release_handle, comm._state, ptr)

    @property
    def ptr(self) -> int:
        if self._ptr is None or self.comm._state.ptr is None:
            raise ValueError("disco: handle used after close() (of the handle or its comm)")
        return self._ptr

    def close(self) -> None:
        """Give the C handle back to the comm now instead of at GC."""
        self._finalizer()
        self._ptr = None

    def __repr__(self) -> str:
        return (f"<disco.Handle rank={self.comm.rank} rows={self.num_rows} "
                f"layout={self.layout}>")


class DispatchResult:
    """Outputs of Comm.dispatch; arrays of the input's kind and memory space.

    x [num_rows, H]; src_rank, src_token [num_rows] int32; expert int32 and
    weight float32, [num_rows] for EXPERT_MAJOR (global expert id) or
    [num_rows, K] for RANK_MAJOR (local ids, -1 where not local);
    tokens_per_expert [E_loc], n_tokens_to_rank / n_tokens_from_rank [W] int32;
    num_rows (int, host); handle for combine.
    """

    def __init__(self, **fields: Any):
        self.x = fields.pop("x")
        self.src_rank = fields.pop("src_rank")
        self.src_token = fields.pop("src_token")
        self.expert = fields.pop("expert")
        self.weight = fields.pop("weight")
        self.tokens_per_expert = fields.pop("tokens_per_expert")
        self.n_tokens_to_rank = fields.pop("n_tokens_to_rank")
        self.n_tokens_from_rank = fields.pop("n_tokens_from_rank")
        self.num_rows: int = fields.pop("num_rows")
        self.handle: Handle = fields.pop("handle")
        self.generation: int = fields.pop("generation")
        self.layout: str = fields.pop("layout")
        self.num_tokens: int = fields.pop("num_tokens")
        self.weighted: bool = fields.pop("weighted")
        self.expert_alignment: int = fields.pop("expert_alignment")
        assert not fields, fields

    def __repr__(self) -> str:
        return (f"<disco.DispatchResult rows={self.num_rows} layout={self.layout} "
                f"tokens_per_expert={self.tokens_per_expert}>")


def _parse_layout(layout: Union[str, int]) -> str:
    if isinstance(layout, int) and not isinstance(layout, bool):
        for name, value in _LAYOUTS.items():
            if value == layout:
                return name
    elif isinstance(layout, str) and layout.lower() in _LAYOUTS:
        return layout.lower()
    raise ValueError(f"disco: layout must be 'expert_major' or 'rank_major', got {layout!r}")


class Comm:
    """One rank's communicator (disco_comm_t).

    Create with disco.local_group (threads in this process, host memory) or
    Comm.from_torch (NCCL, CUDA tensors). Collective calls (dispatch, combine)
    must be made by every rank in the same order; local-group ranks each from
    their own thread (see disco.run_ranks).

    Errors: argument kinds, dtypes, shapes, memory spaces and contiguity are
    checked here and raise TypeError/ValueError before any C call. Such an
    error on one rank leaves its peers waiting in the collective until
    timeout_ms (they then get DiscoError TIMEOUT). Value errors in the data
    (expert ids, duplicates, token counts) are found by the library on all
    ranks together: the faulty rank gets the specific DiscoError, peers get
    DISCO_ERR_REMOTE, and the communicator stays usable.
    """

    def __init__(self, ptr: int, *, _device: str = "cpu"):
        self._state = _CommState(ptr)
        self._finalizer = weakref.finalize(self, _destroy_comm, self._state, False)
        lib = _lib.lib()
        cfg = _lib.config_init()
        check(lib.disco_comm_get_config(ptr, byref(cfg)), "disco_comm_get_config")
        self.rank: int = lib.disco_comm_rank(ptr)
        self.world_size: int = lib.disco_comm_size(ptr)
        self.num_local_experts: int = lib.disco_comm_num_local_experts(ptr)
        self.backend: str = (lib.disco_comm_backend(ptr) or b"").decode()
        self.uses_device_memory = bool(lib.disco_comm_uses_device_memory(ptr))
        self.num_experts: int = cfg.num_experts
        self.top_k: int = cfg.top_k
        self.hidden: int = cfg.hidden
        self.max_tokens: int = cfg.max_tokens
        self.dtype: str = _ENUM_DTYPE[cfg.dtype]
        self.timeout_ms: int = cfg.timeout_ms
        self.device = _device

    # ---- construction -----------------------------------------------------
    @staticmethod
    def make_config(num_experts: int, top_k: int, hidden: int, max_tokens: int,
                    dtype: Any = "float32", timeout_ms: int = 0,
                    combine_wire: str = "fp32", max_sms: int = 0) -> _lib.Config:
        """A disco_config_t as DISCO_CONFIG_INIT plus these fields. Range
        errors (E % W, H alignment) are left to the library, which names them."""
        cfg = _lib.config_init()
        for name, value in (("num_experts", num_experts), ("top_k", top_k),
                            ("hidden", hidden), ("max_tokens", max_tokens),
                            ("timeout_ms", timeout_ms), ("max_sms", max_sms)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"disco: {name} must be an int, got {value!r}")
        if combine_wire not in _WIRES:
            raise ValueError(f"disco: combine_wire must be 'fp32' or 'dtype', got {combine_wire!r}")
        cfg.num_experts, cfg.top_k, cfg.hidden = num_experts, top_k, hidden
        cfg.max_tokens, cfg.timeout_ms, cfg.max_sms = max_tokens, timeout_ms, max_sms
        cfg.dtype = _DTYPE_ENUM[_arrays.canonical_dtype(dtype)]
        cfg.combine_wire = _WIRES[combine_wire]
        return cfg

    @classmethod
    def from_torch(cls, group: Any = None, *, num_experts: int, top_k: int, hidden: int,
                   max_tokens: int, dtype: Any = "bfloat16", timeout_ms: int = 0,
                   combine_wire: str = "fp32", max_sms: int = 0,
                   device: Any = None, backend: str = "nccl") -> "Comm":
        """NCCL-backed comm over a torch.distributed group (collective).

        Makes a fresh ncclComm_t for the group's ranks on the current CUDA
        device (unique id from rank 0 via broadcast_object_list), which this
        Comm owns and destroys at close. Tensors must be CUDA tensors on that
        device; work is enqueued on torch.cuda.current_stream().
        backend="nccl_device": device-initiated transfers (one NVLink domain);
        errors found on the device are raised by check(), not by the call.
        """
        from . import _nccl

        cfg = cls.make_config(num_experts, top_k, hidden, max_tokens, dtype, timeout_ms,
                              combine_wire, max_sms)
        ptr, device_str, on_destroy = _nccl.create_from_torch(group, cfg, device, backend)
        comm = cls(ptr, _device=device_str)
        comm._state.on_destroy = on_destroy
        return comm

    # ---- device-side state ------------------------------------------------
    @property
    def caps(self) -> int:
        """DISCO_CAP_* bits: 1 = no host sync in dispatch/combine, 2 = CUDA-graph capturable."""
        return int(_lib.lib().disco_comm_caps(self._ptr()))

    def max_recv_rows(self, layout: Union[str, int] = "expert_major",
                      expert_alignment: int = 1) -> int:
        """Rows one dispatch can produce at most on this comm (a capacity that never overflows)."""
        rows = c_int64(-1)
        check(_lib.lib().disco_comm_max_recv_rows(self._ptr(), _LAYOUTS[_parse_layout(layout)],
                                                  int(expert_alignment), byref(rows)),
              "disco_comm_max_recv_rows")
        return rows.value

    def check(self, wait: bool = True) -> None:
        """Raise the first error the device found since the last check (backends
        without host sync: bad ids, capacity, a failed peer, timeout); wait=True
        first waits, bounded, for this comm's last enqueued call."""
        self._call("disco_comm_check", self._ptr(), 1 if wait else 0)

    # ---- lifetime ---------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._state.ptr is None

    def close(self) -> None:
        """Destroy the comm and all its handles (local, not collective).
        Waits if another thread is inside a call on this comm."""
        self._finalizer.detach()
        _destroy_comm(self._state, True)

    def __enter__(self) -> "Comm":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.backend
        return (f"<disco.Comm {state} rank {self.rank}/{self.world_size} E={self.num_experts} "
                f"K={self.top_k} H={self.hidden} {self.dtype}>")

    def _ptr(self) -> int:
        if self._state.ptr is None:
            raise ValueError("disco: communicator used after close()")
        return self._state.ptr

    def _stream(self) -> Optional[int]:
        if not self.uses_device_memory:
            return None
        import torch

        return torch.cuda.current_stream(torch.device(self.device)).cuda_stream

    def _call(self, name: str, *args: Any) -> None:
        """A collective C call (caller holds the lock), errors raised."""
        try:
            check(getattr(_lib.lib(), name)(*args), name)
        except DiscoError as e:
            if e.name == "DISCO_ERR_TIMEOUT":
                self._state.broken = True
            raise

    def _acquire_handle(self) -> int:
        """A C handle from the free list or a new one (caller holds the lock)."""
        st = self._state
        lib = _lib.lib()
        while len(st.free) > _MAX_FREE_HANDLES:
            h = st.free.pop(0)
            st.handles.discard(h)
            lib.disco_handle_destroy(h)
        if st.free:
            return st.free.pop()
        out = c_void_p()
        check(lib.disco_handle_create(self._ptr(), byref(out)), "disco_handle_create")
        st.handles.add(out.value)
        return out.value

    def new_handle(self) -> Handle:
        """An explicit handle to pass to dispatch(handle=...)."""
        with self._state.lock:
            return Handle(self, self._acquire_handle())

    # ---- dispatch ---------------------------------------------------------
    def dispatch(self, x: Any, topk_idx: Any, topk_weights: Any = None, *,
                 layout: Union[str, int] = "expert_major", expert_alignment: int = 1,
                 handle: Optional[Handle] = None) -> DispatchResult:
        """Send each token to the ranks holding its experts (collective).

        Outputs are allocated at exactly the received size: the routing plan
        and counts are computed first (disco_dispatch_layout, one count
        exchange), then data moves with DISCO_DISPATCH_REUSE_LAYOUT. bf16 on
        numpy: x may be ml_dtypes.bfloat16 or its bits as uint16; outputs
        have the same numpy dtype as x.
        """
        layout = _parse_layout(layout)
        if not isinstance(expert_alignment, int) or isinstance(expert_alignment, bool) \
                or expert_alignment < 0:
            raise ValueError(
                f"disco: expert_alignment must be an int >= 0, got {expert_alignment!r}")
        if handle is not None and handle.comm is not self:
            raise ValueError("disco: handle belongs to another communicator")
        dev = self.device
        xi = _arrays.inspect(x, "x")
        fw = xi.framework
        xi = _arrays.check_array(x, "x", _arrays.accepted_data_dtypes(self.dtype, fw),
                                 (None, self.hidden), dev)
        T = xi.shape[0]
        ii = _arrays.check_array(topk_idx, "topk_idx", ("int64", "int32"), (T, self.top_k),
                                 dev, fw)
        wi = None
        if topk_weights is not None:
            wi = _arrays.check_array(topk_weights, "topk_weights", ("float32",),
                                     (T, self.top_k), dev, fw)

        args = _lib.dispatch_args_init()
        args.x = _arrays.ptr_or_none(xi)
        args.topk_idx = _arrays.ptr_or_none(ii)
        args.index_type = _lib.INDEX_INT32 if ii.dtype == "int32" else _lib.INDEX_INT64
        if wi is not None:
            args.topk_weights = wi.ptr
        args.num_tokens = T
        args.layout = _LAYOUTS[layout]
        args.expert_alignment = expert_alignment
        args.stream = self._stream()

        with self._state.lock:
            if handle is None:
                handle = Handle(self, self._acquire_handle())
            hptr = handle.ptr
            handle.num_rows = None
            handle.generation += 1
            rows = c_int64(0)
            self._call("disco_dispatch_layout", self._ptr(), hptr, byref(args), byref(rows))
            n = rows.value
            K, W = self.top_k, self.world_size
            meta_shape = (n,) if layout == "expert_major" else (n, K)
            out = dict(
                x=_arrays.empty(fw, (n, self.hidden), xi.dtype, dev),
                src_rank=_arrays.empty(fw, (n,), "int32", dev),
                src_token=_arrays.empty(fw, (n,), "int32", dev),
                expert=_arrays.empty(fw, meta_shape, "int32", dev),
                weight=_arrays.empty(fw, meta_shape, "float32", dev),
                n_tokens_to_rank=_arrays.empty(fw, (W,), "int32", dev),
                n_tokens_from_rank=_arrays.empty(fw, (W,), "int32", dev),
                tokens_per_expert=_arrays.empty(fw, (self.num_local_experts,), "int32", dev),
            )
            num_rows_buf = _arrays.empty(fw, (1,), "int64", dev)
            args.recv_capacity = n
            args.recv_x = _arrays.ptr_or_none(_arrays.inspect(out["x"], "recv_x"))
            for field in ("src_rank", "src_token", "expert", "weight"):
                setattr(args, "recv_" + field,
                        _arrays.ptr_or_none(_arrays.inspect(out[field], field)))
            for field in ("n_tokens_to_rank", "n_tokens_from_rank", "tokens_per_expert"):
                setattr(args, field, _arrays.inspect(out[field], field).ptr)
            args.num_recv_rows = _arrays.inspect(num_rows_buf, "num_recv_rows").ptr
            args.flags = _lib.DISPATCH_REUSE_LAYOUT
            self._call("disco_dispatch", self._ptr(), hptr, byref(args))
            handle.num_rows = n
            handle.num_tokens = T
            handle.layout = layout
            handle.x_dtype = xi.dtype
            handle.framework = fw
        return DispatchResult(num_rows=n, handle=handle, generation=handle.generation,
                              layout=layout, num_tokens=T, weighted=wi is not None,
                              expert_alignment=expert_alignment, **out)

    # ---- combine ----------------------------------------------------------
    def combine(self, expert_out: Any, handle: Union[DispatchResult, Handle], *,
                weighted: bool = True, out: Any = None) -> Any:
        """Bring expert outputs back to their tokens, weighted and summed
        (collective). ``expert_out`` has one row per row of the dispatch
        (padding rows included) in its order; returns [num_tokens, H] of the
        same dtype (or fills ``out``)."""
        if isinstance(handle, DispatchResult):
            res = handle
            handle = res.handle
            if res.generation != handle.generation:
                raise ValueError("disco: this DispatchResult's handle was dispatched again "
                                 "since; combine with the newer result")
        if not isinstance(handle, Handle):
            raise TypeError(f"disco: handle must be a DispatchResult or Handle, got "
                            f"{type(handle).__name__}")
        if handle.comm is not self:
            raise ValueError("disco: handle belongs to another communicator")
        if handle.num_rows is None:
            raise ValueError("disco: handle holds no successful dispatch")
        dev = self.device
        yi = _arrays.inspect(expert_out, "expert_out")
        fw = yi.framework
        yi = _arrays.check_array(expert_out, "expert_out",
                                 _arrays.accepted_data_dtypes(self.dtype, fw),
                                 (handle.num_rows, self.hidden), dev)
        if out is None:
            out = _arrays.empty(fw, (handle.num_tokens, self.hidden), yi.dtype, dev)
        oi = _arrays.check_array(out, "out", (yi.dtype,), (handle.num_tokens, self.hidden),
                                 dev, fw)
        args = _lib.combine_args_init()
        args.y = _arrays.ptr_or_none(yi)
        args.y_rows = handle.num_rows
        args.out = _arrays.ptr_or_none(oi)
        args.weighted = 1 if weighted else 0
        args.stream = self._stream()
        with self._state.lock:
            self._call("disco_combine", self._ptr(), handle.ptr, byref(args))
        return out


# ---- local group and threads ------------------------------------------------
def local_group(world_size: int, *, num_experts: int, top_k: int, hidden: int,
                max_tokens: int, dtype: Any = "float32", timeout_ms: int = 0,
                combine_wire: str = "fp32") -> List[Comm]:
    """W ranks as threads of this process (the local backend), one Comm each.

    Drive rank i's collective calls from its own thread (disco.run_ranks).
    timeout_ms=0 uses $DISCO_TIMEOUT_MS or 10 s.
    """
    if not isinstance(world_size, int) or isinstance(world_size, bool):
        raise TypeError(f"disco: world_size must be an int, got {world_size!r}")
    cfg = Comm.make_config(num_experts, top_k, hidden, max_tokens, dtype, timeout_ms,
                           combine_wire)
    n = max(world_size, 1)
    ptrs = (c_void_p * n)()
    check(_lib.lib().disco_comm_create_local(world_size, byref(cfg), ptrs),
          "disco_comm_create_local")
    return [Comm(ptrs[i]) for i in range(world_size)]


def run_ranks(comms: Sequence[Comm], fn: Callable[[int, Comm], Any],
              timeout: Optional[float] = None) -> List[Any]:
    """Run fn(rank, comm) on one thread per comm; return the results by rank.

    If any rank raises, the exception of the rank that caused the failure is
    re-raised (a specific error is preferred over its peers' DISCO_ERR_REMOTE
    or TIMEOUT), with the other ranks' errors attached as notes.
    """
    n = len(comms)
    results: List[Any] = [None] * n
    errors: List[Optional[BaseException]] = [None] * n

    def body(i: int) -> None:
        try:
            results[i] = fn(i, comms[i])
        except BaseException as e:  # noqa: B902 - re-raised in the caller
            errors[i] = e

    threads = [threading.Thread(target=body, args=(i,), name=f"disco-rank-{i}", daemon=True)
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        if t.is_alive():
            raise TimeoutError(f"disco.run_ranks: {t.name} still running after {timeout} s")
    failed = [(i, e) for i, e in enumerate(errors) if e is not None]
    if not failed:
        return results

    def secondary(e: BaseException) -> bool:
        return isinstance(e, DiscoError) and e.name in ("DISCO_ERR_REMOTE", "DISCO_ERR_TIMEOUT")

    failed.sort(key=lambda ie: (secondary(ie[1]), ie[0]))
    rank, first = failed[0]
    if hasattr(first, "add_note"):
        first.add_note(f"(raised on rank {rank})")
        for i, e in failed[1:]:
            first.add_note(f"rank {i}: {type(e).__name__}: {e}")
    raise first
