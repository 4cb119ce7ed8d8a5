"""Zero-copy DLPack crossing, strided views, and bad input: every error is a distattn.Error
carrying the C++ message that names the tensor and what to change."""

import ctypes

import numpy as np
import pytest
import torch
from torch.utils.dlpack import to_dlpack

import distattn
import distattn.torch as dt
from conftest import all_max, all_true
from helpers import rel_err


def local_qkv(world, strategy="zigzag", b=2, h=4, hkv=2, d=16, dtype=torch.float32, seed=0):
    s = 8 * world.size()
    g = torch.Generator().manual_seed(seed)
    full = [torch.randn(b, s, n, d, generator=g).to(dtype) for n in (h, hkv, hkv)]
    pos = dt.position_ids(strategy, s, world)
    return [x[:, pos].contiguous() for x in full]


def test_view_info_is_the_callers_memory(world):
    x = torch.randn(2, 8, 3, 4)
    v = x[:, :, 1]  # strided view
    info = distattn.view_info(v)
    assert info["data"] == v.data_ptr()
    assert info["strides"] == list(v.stride()) and info["shape"] == list(v.shape)
    assert info["dtype"] == "fp32" and info["device"] == "cpu"
    a = np.zeros((3, 5), np.float32)[:, 1:4]
    info = distattn.view_info(a)
    assert info["data"] == a.ctypes.data and info["strides"] == [5, 1]
    assert distattn.view_info(torch.zeros(2, dtype=torch.bfloat16))["dtype"] == "bf16"


def test_outputs_are_written_in_place_into_caller_tensors(world):
    q, k, v = local_qkv(world)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("nan"))
    dq, dk, dv = (torch.full_like(x, float("nan")) for x in (q, k, v))
    ptrs = [t.data_ptr() for t in (q, k, v, out, lse, dq, dk, dv)]
    distattn.sp_attention_forward("zigzag", world, q, k, v, out, lse, causal=True)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    distattn.sp_attention_backward("zigzag", world, q, k, v, out, dout, lse, dq, dk, dv,
                                   causal=True)
    assert [t.data_ptr() for t in (q, k, v, out, lse, dq, dk, dv)] == ptrs
    # The autograd path gives the same numbers from its own allocations.
    qa, ka, va = (x.clone().requires_grad_() for x in (q, k, v))
    oa = dt.attention(qa, ka, va, strategy="zigzag", causal=True)
    oa.backward(dout)
    errs = [rel_err(a, b) for a, b in [(out, oa), (dq, qa.grad), (dk, ka.grad), (dv, va.grad)]]
    assert all_max(world, max(errs)) == 0.0


def test_fused_qkv_and_bhsd_views_are_used_in_place(world):
    q, k, v = local_qkv(world, hkv=4)
    ref = dt.attention(q, k, v, strategy="ring")
    qkv = torch.stack([q, k, v], dim=2)  # [B, S, 3, H, D]: q, k, v are strided views
    fused = dt.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], strategy="ring")
    bhsd = [x.transpose(1, 2).contiguous() for x in (q, k, v)]  # SDPA layout
    trans = dt.attention(*(x.transpose(1, 2) for x in bhsd), strategy="ring").transpose(1, 2)
    assert all_max(world, max(rel_err(fused, ref), rel_err(trans.transpose(1, 2), ref))) == 0.0


def test_numpy_outputs_are_filled_in_place(world):
    q, k, v = (x.numpy() for x in local_qkv(world))
    out = np.zeros_like(q)
    lse = np.zeros((q.shape[0], q.shape[2], q.shape[1]), np.float32)
    before = out.ctypes.data
    distattn.sp_attention_forward("zigzag", world, q, k, v, out, lse, causal=True)
    assert out.ctypes.data == before and np.abs(out).max() > 0 and np.isfinite(lse).all()


def expect_error(exc_type, *fragments):
    """pytest.raises that also checks the message fragments and the C++ attributes."""
    class _Ctx:
        def __enter__(self):
            self.ctx = pytest.raises(exc_type)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            e = self.info.value
            assert isinstance(e, distattn.Error)
            assert str(e).startswith("[distattn ") and str(e).endswith(e.message)
            for f in fragments:
                assert f in e.message, (f, e.message)
            return handled
    return _Ctx()


def call_forward(world, q, k, v, out=None, lse=None, strategy="zigzag", **kw):
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1]) if lse is None else lse
    distattn.sp_attention_forward(strategy, world, q, k, v, out, lse, **kw)


def test_wrong_dtype(world):
    q, k, v = (x.double() for x in local_qkv(world))
    with expect_error(distattn.InvalidArgumentError, "q is fp64", "use fp32, bf16 or fp16"):
        call_forward(world, q, k, v)
    q, k, v = local_qkv(world)
    with expect_error(ValueError, "q, k, v must share a dtype"):
        call_forward(world, q, k.half(), v)
    with expect_error(distattn.InvalidArgumentError, "q has element type complex64"):
        call_forward(world, q.to(torch.complex64), k, v, out=q.clone())


def test_wrong_layout(world):
    q, k, v = local_qkv(world)
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # last dim strided
    with expect_error(distattn.InvalidArgumentError, "q ", "must be contiguous in its last dim"):
        call_forward(world, qt, k, v)
    with expect_error(distattn.InvalidArgumentError, "q ", "must have 4 dims"):
        dt.attention(q[0], k, v, strategy="zigzag")


def test_mismatched_shapes(world):
    q, k, v = local_qkv(world)
    with expect_error(distattn.InvalidArgumentError, "k has shape", "but must be"):
        call_forward(world, q, k[..., :8], v)
    with expect_error(distattn.InvalidArgumentError, "lse has shape"):
        call_forward(world, q, k, v, lse=torch.empty(1, 2, 3))


def test_not_an_array_and_read_only_output(world):
    q, k, v = (x.numpy() for x in local_qkv(world))
    with expect_error(distattn.InvalidArgumentError, "q: expected an array that supports DLPack",
                      "list"):
        distattn.sp_attention_forward("zigzag", world, q.tolist(), k, v, q, q)
    out = np.zeros_like(q)
    out.flags.writeable = False
    lse = np.zeros((q.shape[0], q.shape[2], q.shape[1]), np.float32)
    with expect_error(distattn.InvalidArgumentError, "out is read-only"):
        distattn.sp_attention_forward("zigzag", world, q, k, v, out, lse)


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device_type", ctypes.c_int32),
                ("device_id", ctypes.c_int32)]


def on_fake_device(t: torch.Tensor, device_type: int):
    """A DLPack capsule of t's memory that CLAIMS another device (no GPU needed): the C++
    checks must reject it before any kernel touches the memory."""
    cap = to_dlpack(t)
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    _DLTensor.from_address(get(cap, b"dltensor")).device_type = device_type
    return cap


def test_tensor_on_the_wrong_device(world):
    q, k, v = local_qkv(world)
    with expect_error(distattn.InvalidArgumentError, "k is on cuda:0 but q is on cpu"):
        call_forward(world, q, on_fake_device(k, 2), v)
    with expect_error(distattn.InvalidArgumentError, "v lives on DLPack device type 4"):
        call_forward(world, q, k, on_fake_device(v, 4))  # OpenCL


def test_divisibility_and_head_counts(world):
    with expect_error(distattn.InvalidArgumentError, "multiple of 8", "pad it at the END to 104"):
        distattn.check_layout(distattn.Layout("zigzag", 4), distattn.Shape(1, 100, 4, 4, 64))
    with expect_error(distattn.InvalidArgumentError, "sequence length to be a multiple"):
        distattn.token_positions("allgather", 6, 4, 0)
    q, k, v = local_qkv(world)
    with expect_error(distattn.InvalidArgumentError, "local sequence length must be even"):
        dt.attention(q[:, :-1], k[:, :-1], v[:, :-1], strategy="zigzag")
    with expect_error(distattn.InvalidArgumentError, "heads_q and heads_kv"):
        dt.attention(q, k, v, strategy="heads")
    with expect_error(distattn.InvalidArgumentError, "unknown sequence-parallel strategy 'zig'"):
        dt.attention(q, k, v, strategy="zig")
    with expect_error(distattn.InvalidArgumentError, "the SpGroup has no Ulysses communicator"):
        dt.attention(q, k, v, strategy="hybrid")
    with pytest.raises(distattn.InvalidArgumentError, match="group must be"):
        dt.attention(q, k, v, strategy="ring", group="world")
    assert all_true(world, True)


def test_error_records_status_and_rank(world):
    with pytest.raises(distattn.Error) as info:
        distattn.parse_strategy("nope")
    e = info.value
    assert e.status == "invalid argument" and e.rank == world.rank()
    assert "use heads, ring, zigzag, ulysses, allgather or hybrid" in e.message
