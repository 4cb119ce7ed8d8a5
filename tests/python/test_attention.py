"""distattn.torch.attention forward and backward for every strategy, causal and not, MHA
and GQA, fp32 and bf16, against PyTorch's attention on the full tensors (fp64)."""

import pytest
import torch

import distattn
import distattn.torch as dt
from conftest import all_max, hybrid_mesh
from helpers import gather_kv_grad, group_for, problem, rel_err, torch_attention

STRATEGIES = distattn.strategies()
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def mesh(world):
    return hybrid_mesh(world)


def full_inputs(b, s, h, hkv, d, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    mk = lambda heads: torch.randn(b, s, heads, d, generator=g).to(dtype)
    return mk(h), mk(hkv), mk(hkv), mk(h)


CASES = [(s, c, hk, torch.float32) for s in STRATEGIES for c in (False, True) for hk in (4, 1)]
CASES += [(s, True, 2, torch.bfloat16) for s in STRATEGIES]


@pytest.mark.parametrize("strategy,causal,hkv,dtype", CASES)
def test_forward_backward_match_pytorch_attention(world, mesh, strategy, causal, hkv, dtype):
    b, s, h, d = 2, 48, 4, 16
    q, k, v, dout = full_inputs(b, s, h, hkv, d, dtype)
    # Reference: PyTorch attention in fp64 on the full (dtype-rounded) tensors.
    qr, kr, vr = (x.double().requires_grad_() for x in (q, k, v))
    ref = torch_attention(qr, kr, vr, causal)
    ref.backward(dout.double())

    g, layout, rank, shape = problem(world, mesh, strategy, b, s, h, hkv, d)
    ql, kl, vl, dol = (distattn.shard(layout, shape, rank, role, x)
                       for role, x in [("query", q), ("kv", k), ("kv", v), ("query", dout)])
    for x in (ql, kl, vl):
        x.requires_grad_()
    out = dt.attention(ql, kl, vl, strategy=strategy, group=group_for(world, mesh, strategy),
                       causal=causal, heads_q=h, heads_kv=hkv)
    assert out.dtype == dtype and out.shape == ql.shape
    out.backward(dol)
    shard = lambda role, x: distattn.shard(layout, shape, rank, role, x.detach())
    errs = {
        "out": rel_err(out, shard("query", ref)),
        "dq": rel_err(ql.grad, shard("query", qr.grad)),
        "dk": rel_err(gather_kv_grad(world, layout, shape, rank, kl.grad, k), kr.grad),
        "dv": rel_err(gather_kv_grad(world, layout, shape, rank, vl.grad, v), vr.grad),
    }
    assert all_max(world, max(errs.values())) <= TOL[dtype], errs


def test_lse_is_log_sum_exp_of_scaled_scores(world, mesh):
    b, s, h, d = 1, 32, 2, 8
    q, k, v, _ = full_inputs(b, s, h, h, d, torch.float32, seed=3)
    scores = torch.einsum("bshd,bthd->bhst", q.double(), k.double()) / d ** 0.5
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    ref_lse = torch.logsumexp(scores, dim=-1)  # [B, H, S]
    g, layout, rank, shape = problem(world, mesh, "zigzag", b, s, h, h, d)
    ql, kl, vl = (distattn.shard(layout, shape, rank, r, x)
                  for r, x in [("query", q), ("kv", k), ("kv", v)])
    _, lse = dt.attention(ql, kl, vl, strategy="zigzag", causal=True, return_lse=True)
    err = rel_err(lse, distattn.shard(layout, shape, rank, "lse", ref_lse.float()))
    assert all_max(world, err) <= 2e-5


def test_softmax_scale_is_applied(world):
    b, s, h, d = 1, 16, 2, 8
    q, k, v, _ = full_inputs(b, s, h, h, d, torch.float32, seed=4)
    pos = dt.position_ids("ring", s, world)
    ql, kl, vl = (x[:, pos] for x in (q, k, v))
    a = dt.attention(ql, kl, vl, strategy="ring", softmax_scale=0.5)
    bb = dt.attention(ql * (0.5 * d ** 0.5), kl, vl, strategy="ring")
    assert all_max(world, rel_err(a, bb)) <= 1e-5
