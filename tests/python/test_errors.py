"""Errors: C errors become DiscoError with the library's message; argument
kind/shape errors are TypeError/ValueError raised before any C call."""

import numpy as np
import pytest

import disco

W, E, K, H, T = 2, 4, 2, 4, 4


@pytest.fixture
def comms(make_group):
    return make_group(W, num_experts=E, top_k=K, hidden=H, max_tokens=T)


def _args(T_=3):
    x = np.arange(T_ * H, dtype=np.float32).reshape(T_, H)
    idx = np.tile(np.array([[0, 3]], np.int64), (T_, 1))
    return x, idx


def _collective_error(comms, bad_rank, idx_bad):
    x, idx = _args()

    def step(r, c):
        try:
            c.dispatch(x, idx_bad if r == bad_rank else idx)
        except disco.DiscoError as e:
            return e
        return None

    errs = [None] * W
    import threading

    def body(r):
        errs[r] = step(r, comms[r])

    ts = [threading.Thread(target=body, args=(r,)) for r in range(W)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return errs


def test_bad_expert_id(comms):
    x, idx = _args()
    bad = idx.copy()
    bad[1, 1] = 17
    errs = _collective_error(comms, 1, bad)
    assert errs[1].name == "DISCO_ERR_EXPERT_OUT_OF_RANGE" and errs[1].code == 5
    assert "topk_idx[1][1] = 17" in errs[1].message and "rank 1" in errs[1].message
    assert errs[0].name == "DISCO_ERR_REMOTE"

    # The communicator stays usable.
    def again(r, c):
        res = c.dispatch(x, idx)
        return c.combine(res.x, res, weighted=False)

    res = disco.run_ranks(comms, again)
    np.testing.assert_array_equal(res[0], 2 * x)


def test_bad_id_run_ranks_reraises_root_cause(comms):
    x, idx = _args()
    bad = idx.copy()
    bad[0, 0] = -2
    with pytest.raises(disco.DiscoError) as ei:
        disco.run_ranks(comms, lambda r, c: c.dispatch(x, bad if r == 0 else idx))
    assert ei.value.name == "DISCO_ERR_EXPERT_OUT_OF_RANGE"
    assert "-2" in str(ei.value)


def test_duplicate_expert(comms):
    x, idx = _args()
    bad = idx.copy()
    bad[2] = [3, 3]
    errs = _collective_error(comms, 0, bad)
    assert errs[0].name == "DISCO_ERR_DUPLICATE_EXPERT"
    assert "rank 0" in errs[0].message
    assert errs[1].name == "DISCO_ERR_REMOTE"


def test_too_many_tokens(comms):
    x = np.zeros((T + 1, H), np.float32)
    idx = np.zeros((T + 1, K), np.int64) - 1
    with pytest.raises(disco.DiscoError) as ei:
        disco.run_ranks(comms, lambda r, c: c.dispatch(x if r == 1 else x[:1],
                                                       idx if r == 1 else idx[:1]))
    assert ei.value.name == "DISCO_ERR_TOO_MANY_TOKENS"


def test_config_errors():
    with pytest.raises(disco.DiscoError) as ei:
        disco.local_group(3, num_experts=4, top_k=1, hidden=4, max_tokens=1)
    assert ei.value.name == "DISCO_ERR_EXPERT_DIVISIBILITY"
    with pytest.raises(disco.DiscoError) as ei:
        disco.local_group(1, num_experts=4, top_k=1, hidden=3, max_tokens=1)
    assert ei.value.name == "DISCO_ERR_HIDDEN_ALIGNMENT"
    assert ei.value.message
    with pytest.raises(ValueError, match="float64 is not supported"):
        disco.local_group(1, num_experts=4, top_k=1, hidden=4, max_tokens=1, dtype="float64")


@pytest.mark.parametrize("what,exc,match", [
    ("x_dtype", TypeError, "x has dtype float64, expected float32"),
    ("idx_dtype", TypeError, "topk_idx has dtype int16"),
    ("w_dtype", TypeError, "topk_weights has dtype float64"),
    ("x_shape", ValueError, r"x has shape \[3, 8\], expected \[\*, 4\]"),
    ("idx_shape", ValueError, r"topk_idx has shape \[3, 3\], expected \[3, 2\]"),
    ("x_noncontig", ValueError, "x must be C-contiguous"),
    ("idx_noncontig", ValueError, "topk_idx must be C-contiguous"),
    ("x_list", TypeError, "x must be a numpy.ndarray or torch.Tensor"),
    ("layout", ValueError, "layout must be"),
    ("align", ValueError, "expert_alignment must be"),
])
def test_argument_errors_before_c(comms, what, exc, match):
    x, idx = _args()
    w = None
    kw = {}
    if what == "x_dtype":
        x = x.astype(np.float64)
    elif what == "idx_dtype":
        idx = idx.astype(np.int16)
    elif what == "w_dtype":
        w = np.ones((3, K))
    elif what == "x_shape":
        x = np.zeros((3, 8), np.float32)
    elif what == "idx_shape":
        idx = np.zeros((3, 3), np.int64)
    elif what == "x_noncontig":
        x = np.zeros((3, 2 * H), np.float32)[:, ::2]
    elif what == "idx_noncontig":
        idx = np.asfortranarray(np.zeros((3, K), np.int64))
    elif what == "x_list":
        x = x.tolist()
    elif what == "layout":
        kw["layout"] = "token_major"
    elif what == "align":
        kw["expert_alignment"] = -1
    # Raised on rank 0 alone with no peer calling: only possible if no C
    # collective was entered (it would wait for rank 1 and time out).
    with pytest.raises(exc, match=match):
        comms[0].dispatch(x, idx, w, **kw)


def test_combine_argument_errors(comms):
    x, idx = _args()
    results = disco.run_ranks(comms, lambda r, c: c.dispatch(x, idx))
    c, res = comms[0], results[0]
    with pytest.raises(ValueError, match="expert_out has shape"):
        c.combine(res.x[:-1], res)
    with pytest.raises(TypeError, match="expert_out has dtype float16"):
        c.combine(res.x.astype(np.float16), res)
    with pytest.raises(ValueError, match="another communicator"):
        comms[1].combine(res.x, res)
    with pytest.raises(TypeError, match="DispatchResult or Handle"):
        c.combine(res.x, object())
    with pytest.raises(ValueError, match="holds no successful dispatch"):
        c.combine(res.x, c.new_handle())


def test_use_after_close(make_group):
    (c,) = make_group(1, num_experts=2, top_k=1, hidden=4, max_tokens=2)
    x, idx = np.zeros((1, 4), np.float32), np.zeros((1, 1), np.int64)
    res = c.dispatch(x, idx)
    c.close()
    c.close()  # idempotent
    assert c.closed
    with pytest.raises(ValueError, match="after close"):
        c.dispatch(x, idx)
    with pytest.raises(ValueError, match="after close"):
        c.combine(res.x, res)


def test_error_message_is_thread_local_and_cleared(comms):
    # A failed call's message is read on the failing thread; a later success
    # on another thread does not clobber it.
    x, idx = _args()
    bad = idx.copy()
    bad[0, 0] = 99
    errs = _collective_error(comms, 0, bad)
    assert "99" in str(errs[0])
