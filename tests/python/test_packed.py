"""distattn.torch.attention with packed documents (cu_seqlens), a sliding window, sink tokens
and learned sinks, for every strategy, forward and backward (dsinks too), against a dense
fp64 PyTorch reference with the same mask on the full packed sequence."""

import pytest
import torch

import distattn
import distattn.torch as dt
from conftest import all_max, hybrid_mesh
from helpers import gather_kv_grad, group_for, rel_err

STRATEGIES = distattn.strategies()


@pytest.fixture(scope="module")
def mesh(world):
    return hybrid_mesh(world)


def reference(q, k, v, cu, window, sink_tokens, sinks):
    """fp64 attention over [1, T, H, D] with documents, a causal window, sink tokens and a
    per-head sink logit in the denominator (GQA by repeating k, v)."""
    t, h = q.shape[1], q.shape[2]
    g = h // k.shape[2]
    kk, vv = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    doc = torch.zeros(t, dtype=torch.long)
    pos = torch.zeros(t, dtype=torch.long)
    for d in range(len(cu) - 1):
        doc[cu[d]:cu[d + 1]] = d
        pos[cu[d]:cu[d + 1]] = torch.arange(cu[d + 1] - cu[d])
    qi, kj = pos[:, None], pos[None, :]
    visible = (doc[:, None] == doc[None, :]) & (kj <= qi)
    if window[0] >= 0:
        visible &= (kj >= qi - window[0]) | (kj < sink_tokens)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kk) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~visible, float("-inf"))
    sink = sinks.view(1, h, 1, 1).expand(1, h, t, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return torch.einsum("bhqk,bkhd->bqhd", probs, vv)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_packed_window_sinks_match_reference(world, mesh, strategy):
    docs = [1, 7, 13, 2, 40, 3, 29]
    cu = [0]
    for n in docs:
        cu.append(cu[-1] + n)
    t, h, hkv, d = cu[-1], 4, 2, 16
    window, sink_tokens = (9, 0), 2
    gen = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(1, t, n, d, generator=gen) for n in (h, hkv, hkv, h))
    sinks = torch.tensor([0.3, -0.5, 0.1, 0.8])

    qr, kr, vr, sr = (x.double().requires_grad_() for x in (q, k, v, sinks))
    ref = reference(qr, kr, vr, cu, window, sink_tokens, sr)
    ref.backward(dout.double())

    g = distattn.as_group(group_for(world, mesh, strategy))
    layout, rank = g.layout(strategy), g.layout_rank(strategy)
    shape = distattn.Shape(1, t, h, hkv, d)
    shape.cu_seqlens = cu
    ql, kl, vl, dol = (distattn.shard(layout, shape, rank, role, x)
                       for role, x in [("query", q), ("kv", k), ("kv", v), ("query", dout)])
    for x in (ql, kl, vl):
        x.requires_grad_()
    sl = sinks.clone().requires_grad_()
    out = dt.attention(ql, kl, vl, strategy=strategy, group=group_for(world, mesh, strategy),
                       causal=True, heads_q=h, heads_kv=hkv, cu_seqlens=cu, window=window,
                       sink_tokens=sink_tokens, sinks=sl)
    out.backward(dol)
    shard = lambda role, x: distattn.shard(layout, shape, rank, role, x.detach())
    errs = {
        "out": rel_err(out, shard("query", ref)),
        "dq": rel_err(ql.grad, shard("query", qr.grad)),
        "dk": rel_err(gather_kv_grad(world, layout, shape, rank, kl.grad, k), kr.grad),
        "dv": rel_err(gather_kv_grad(world, layout, shape, rank, vl.grad, v), vr.grad),
        "dsinks": rel_err(sl.grad, sr.grad),
    }
    assert all_max(world, max(errs.values())) <= 2e-5, errs
