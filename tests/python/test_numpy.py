"""The package without torch: NumPy arrays through the low-level API (also run with
`import torch` blocked: run_pytest.py --no-torch)."""

import sys

import numpy as np
import pytest

import distattn
from conftest import NO_TORCH, all_max

STRATEGIES = ["heads", "ring", "zigzag", "ulysses", "allgather"]


def reference(q, k, v, causal):
    """fp64 attention and its vjp pieces in NumPy: q [B,S,H,D], k/v [B,S,Hkv,D]."""
    b, s, h, d = q.shape
    g = h // k.shape[2]
    kk, vv = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    scores = np.einsum("bshd,bthd->bhst", q, kk) / np.sqrt(d)
    if causal:
        scores = np.where(np.triu(np.ones((s, s), bool), 1), -np.inf, scores)
    m = scores.max(-1, keepdims=True)
    p = np.exp(scores - m)
    lse = (np.log(p.sum(-1, keepdims=True)) + m)[..., 0]  # [B, H, S]
    p = p / p.sum(-1, keepdims=True)
    out = np.einsum("bhst,bthd->bshd", p, vv)
    return out, lse, p, kk, vv


def reference_grads(q, k, v, dout, causal):
    b, s, h, d = q.shape
    hkv = k.shape[2]
    out, _, p, kk, vv = reference(q, k, v, causal)
    dv = np.einsum("bhst,bshd->bthd", p, dout)
    dp = np.einsum("bshd,bthd->bhst", dout, vv)
    ds = p * (dp - np.einsum("bshd,bshd->bhs", dout, out)[..., None]) / np.sqrt(d)
    dq = np.einsum("bhst,bthd->bshd", ds, kk)
    dk = np.einsum("bhst,bshd->bthd", ds, q)
    fold = lambda x: x.reshape(b, s, hkv, h // hkv, -1).sum(3)
    return dq, fold(dk), fold(dv)


def test_import_does_not_import_torch():
    assert "distattn" in sys.modules
    if NO_TORCH:
        assert sys.modules.get("torch") is None
        with pytest.raises(ImportError):
            distattn.torch  # noqa: B018 (lazy submodule: needs torch)
    else:
        import subprocess
        code = "import sys, distattn; print('torch' in sys.modules)"
        # A child process: the package alone must not pull torch in.
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={k: v for k, v in __import__("os").environ.items()
                                  if not k.startswith(("OMPI_", "PMIX_"))})
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "False"


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("causal", [False, True])
def test_numpy_round_trip_matches_fp64_reference(world, strategy, causal):
    p = world.size()
    b, s, h, hkv, d = 2, 8 * 4, 4, 2, 8
    rng = np.random.default_rng(7)
    q, k, v, dout = (rng.standard_normal(shape).astype(np.float32)
                     for shape in [(b, s, h, d), (b, s, hkv, d), (b, s, hkv, d), (b, s, h, d)])
    layout, shape = distattn.Layout(strategy, p), distattn.Shape(b, s, h, hkv, d)
    r = world.rank()
    ql, kl, vl, dol = (distattn.shard(layout, shape, r, role, x)
                       for role, x in [("query", q), ("kv", k), ("kv", v), ("query", dout)])
    assert isinstance(ql, np.ndarray) and ql.dtype == np.float32
    out = np.full(ql.shape, np.nan, np.float32)
    lse = np.full((b, ql.shape[2], ql.shape[1]), np.nan, np.float32)
    ptr = out.ctypes.data
    opts = dict(causal=causal, heads_q=h, heads_kv=hkv)
    stats = distattn.sp_attention_forward(strategy, world, ql, kl, vl, out, lse, **opts)
    assert out.ctypes.data == ptr and stats.total_s > 0
    dq, dk, dv = np.empty_like(ql), np.empty_like(kl), np.empty_like(vl)
    distattn.sp_attention_backward(strategy, world, ql, kl, vl, out, dol, lse, dq, dk, dv, **opts)

    q64, k64, v64, do64 = (x.astype(np.float64) for x in (q, k, v, dout))
    ref_out, ref_lse, _, _, _ = reference(q64, k64, v64, causal)
    ref_dq, ref_dk, ref_dv = reference_grads(q64, k64, v64, do64, causal)
    rel = lambda a, e: float(np.abs(a - e).max() / np.abs(e).max())
    errs = [rel(out, distattn.shard(layout, shape, r, "query", ref_out)),
            rel(lse, distattn.shard(layout, shape, r, "lse", ref_lse.astype(np.float32))),
            rel(dq, distattn.shard(layout, shape, r, "query", ref_dq))]
    for local, ref in [(dk, ref_dk), (dv, ref_dv)]:  # summed over ranks (heads: replicas)
        full = np.zeros(ref.shape, np.float32)
        distattn.unshard_into(layout, shape, r, "kv", local, full, accumulate=True)
        world.all_reduce(full)
        errs.append(rel(full, ref))
    assert all_max(world, max(errs)) <= 2e-5, errs


def test_unshard_into_rebuilds_full_tensor(world):
    p, r = world.size(), world.rank()
    b, s, h, d = 1, 4 * p * 2, 2, 4
    x = np.arange(b * s * h * d, dtype=np.float32).reshape(b, s, h, d)
    for strategy in STRATEGIES:
        layout, shape = distattn.Layout(strategy, p), distattn.Shape(b, s, max(h, p), 1, d)
        xx = np.repeat(x, shape.heads_q // h, axis=2) if shape.heads_q != h else x
        full = np.zeros_like(xx)
        distattn.unshard_into(layout, shape, r, "query",
                              distattn.shard(layout, shape, r, "query", xx), full,
                              accumulate=True)
        world.all_reduce(full)
        assert np.array_equal(full, xx), strategy
