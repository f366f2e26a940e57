"""Lifetime: GC and interpreter exit with live comms and handles never hang
or crash; close is idempotent; context manager."""

import gc
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import disco

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_script(code, timeout=60):
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "python"))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_exit_with_live_comms_and_handles():
    p = _run_script("""
        import numpy as np, disco
        comms = disco.local_group(3, num_experts=3, top_k=1, hidden=4, max_tokens=2)
        x = np.ones((2, 4), np.float32); idx = np.array([[0], [2]])
        results = disco.run_ranks(comms, lambda r, c: c.dispatch(x, idx))
        extra = comms[1].new_handle()
        cycle = [comms, results]; cycle.append(cycle)   # a reference cycle too
        print("ok")
    """)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ok"


def test_exit_while_peer_waits_in_collective():
    # Rank 1 never joins: rank 0 is inside dispatch on a daemon thread when
    # the interpreter exits. Exit must not wait for it (nor for its timeout).
    p = _run_script("""
        import threading, time, numpy as np, disco
        comms = disco.local_group(2, num_experts=2, top_k=1, hidden=4, max_tokens=2,
                                  timeout_ms=30000)
        x = np.ones((1, 4), np.float32); idx = np.array([[1]])
        t = threading.Thread(target=lambda: comms[0].dispatch(x, idx), daemon=True)
        t.start(); time.sleep(0.2)
        print("exiting")
    """, timeout=25)
    assert p.returncode == 0, p.stderr


def test_gc_in_any_order():
    comms = disco.local_group(2, num_experts=2, top_k=1, hidden=4, max_tokens=2)
    x = np.ones((2, 4), np.float32)
    idx = np.array([[0], [1]])
    results = disco.run_ranks(comms, lambda r, c: c.dispatch(x, idx))
    handles = [c.new_handle() for c in comms]
    del comms
    gc.collect()
    # Comms are alive through their results/handles; combine still works.
    outs = disco.run_ranks([res.handle.comm for res in results],
                           lambda r, c, results=results: c.combine(results[r].x, results[r]))
    np.testing.assert_array_equal(outs[0], x)
    del results, outs
    gc.collect()
    del handles
    gc.collect()


def test_handles_are_recycled():
    (c,) = disco.local_group(1, num_experts=2, top_k=1, hidden=4, max_tokens=2)
    x = np.ones((2, 4), np.float32)
    idx = np.array([[0], [1]])
    for _ in range(50):
        c.combine(c.dispatch(x, idx).x, c.dispatch(x, idx))
    gc.collect()
    assert len(c._state.handles) <= 10
    c.close()
    assert not c._state.handles


def test_context_manager():
    with disco.local_group(1, num_experts=2, top_k=1, hidden=4, max_tokens=2)[0] as c:
        assert not c.closed
    assert c.closed


def test_caps_bounds_and_check_on_a_host_backend():
    comms = disco.local_group(2, num_experts=8, top_k=3, hidden=4, max_tokens=5)
    try:
        c = comms[0]
        assert c.caps == 0  # host backends wait for everything
        c.check()
        c.check(wait=False)
        # W * M * min(K, E_loc) (+ E_loc * (alignment - 1)); W * M rank-major
        assert c.max_recv_rows() == 2 * 5 * 3
        assert c.max_recv_rows("expert_major", 4) == 2 * 5 * 3 + 4 * 3
        assert c.max_recv_rows("rank_major") == 2 * 5
        with pytest.raises(disco.DiscoError) as e:
            c.max_recv_rows("expert_major", -1)
        assert e.value.name == "DISCO_ERR_INVALID_ARGUMENT"
    finally:
        for c in comms:
            c.close()
