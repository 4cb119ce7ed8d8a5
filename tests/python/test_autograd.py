"""The autograd Function against finite differences of the distributed loss, the batch
sharding helpers, and the documentation users read with help()."""

import pytest
import torch

import distattn
import distattn.torch as dt
from conftest import all_max, all_true, hybrid_mesh
from helpers import group_for, problem


@pytest.fixture(scope="module")
def mesh(world):
    return hybrid_mesh(world)


@pytest.mark.parametrize("strategy", distattn.strategies())
def test_gradients_match_finite_differences_of_the_global_loss(world, mesh, strategy):
    """L = sum over ranks of <out_local, w_local>. Its directional derivative along a random
    u (every rank perturbs its own q, k, v shards) by central differences must equal
    sum over ranks of <grad_local, u_local> from the autograd Function."""
    b, s, h, hkv, d = 1, 16, 4, 2, 8
    grp, layout, rank, shape = problem(world, mesh, strategy, b, s, h, hkv, d)
    group = group_for(world, mesh, strategy)
    gen = torch.Generator().manual_seed(11)
    full = [torch.randn(b, s, n, d, generator=gen) for n in (h, hkv, hkv, h, h, hkv, hkv)]
    q, k, v, w, uq, uk, uv = (
        distattn.shard(layout, shape, rank, "query" if x.shape[2] == h else "kv", x)
        for x in full)

    def loss(qq, kk, vv):
        o = dt.attention(qq, kk, vv, strategy=strategy, group=group, causal=True,
                         heads_q=h, heads_kv=hkv)
        return (o.double() * w.double()).sum()

    def global_sum(x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        world.all_reduce(t)
        return t.item()

    qa, ka, va = (x.clone().requires_grad_() for x in (q, k, v))
    loss(qa, ka, va).backward()
    analytic = global_sum(sum(float((g.double() * u.double()).sum())
                              for g, u in [(qa.grad, uq), (ka.grad, uk), (va.grad, uv)]))
    eps = 1e-2
    with torch.no_grad():
        plus = global_sum(float(loss(q + eps * uq, k + eps * uk, v + eps * uv)))
        minus = global_sum(float(loss(q - eps * uq, k - eps * uk, v - eps * uv)))
    numeric = (plus - minus) / (2 * eps)
    assert abs(numeric - analytic) <= 2e-3 * max(1.0, abs(analytic)), (numeric, analytic)


@pytest.mark.parametrize("strategy", distattn.strategies())
def test_shard_batch_and_unshard_batch_round_trip(world, mesh, strategy):
    group = group_for(world, mesh, strategy)
    s = 8 * world.size()
    tokens = torch.arange(2 * s).reshape(2, s)
    hidden = torch.randn(2, s, 3, generator=torch.Generator().manual_seed(2))
    (tl, hl), pos = dt.shard_batch([tokens, hidden], strategy, group)
    g = distattn.as_group(group)
    assert pos.tolist() == distattn.token_positions(g.layout(strategy), s,
                                                    g.layout_rank(strategy))
    assert torch.equal(tl, tokens[:, pos]) and torch.equal(hl, hidden[:, pos])
    back_t, back_h = dt.unshard_batch([tl, hl], strategy, group)
    assert all_true(world, torch.equal(back_t, tokens) and torch.equal(back_h, hidden))
    single, _ = dt.shard_batch(hidden, strategy, group)
    assert torch.equal(single, hl)
    with pytest.raises(distattn.InvalidArgumentError, match="tensor 1 has"):
        dt.shard_batch([tokens, hidden[:, :-1]], strategy, group)


def test_token_positions_names_and_types(world):
    pos = distattn.token_positions("zigzag", 16, 2, 1)
    assert pos == [4, 5, 6, 7, 8, 9, 10, 11] and all(type(p) is int for p in pos)
    assert distattn.token_positions(distattn.Layout("hybrid", 4, 2), 16, 3) == [6, 7, 10, 11]
    assert distattn.strategies() == ["heads", "ring", "zigzag", "ulysses", "allgather", "hybrid"]
    assert dt.position_ids("ring", 8, world).dtype == torch.int64


def test_help_states_shapes_layouts_and_local_meaning():
    doc = dt.attention.__doc__
    for needle in ["BSHD", "[B, Sl, Hl,   D]", "lse fp32", "Last dim contiguous", "heads_q",
                   "zigzag", "2P-1-rank", "ulysses", "hybrid", "DeviceMesh", "group"]:
        assert needle in doc, needle
    assert "transpose(1, 2)" in dt.__doc__  # the BHSD (SDPA layout) recipe
    assert "what \"local\" means" in distattn.__doc__ or "*local*" in distattn.__doc__


def test_saved_forward_backward_twice_in_place_change_and_unused_output(world):
    """The backward reuses the forward's DLPack imports (a SavedCall): a second backward with
    retain_graph gives the same gradients, changing q in place after the forward is caught by
    autograd, and lse (non-differentiable) makes no gradient while out's zero one adds none."""
    b, sl, h, d = 1, 8, 2, 8
    gen = torch.Generator().manual_seed(5 + world.rank())
    q, k, v = (torch.randn(b, sl, h, d, generator=gen).requires_grad_() for _ in range(3))
    o = dt.attention(q, k, v, strategy="zigzag", causal=True)
    o.sum().backward(retain_graph=True)
    first = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    o.sum().backward()
    assert all_true(world, all(torch.equal(a, x.grad) for a, x in zip(first, (q, k, v))))

    q2 = q.detach().clone().requires_grad_()
    base = q2 * 1.0  # a non-leaf that autograd lets us change in place
    o2 = dt.attention(base, k, v, strategy="zigzag", causal=True)
    with torch.no_grad():
        base.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        o2.sum().backward()

    o3, lse = dt.attention(q, k, v, strategy="zigzag", causal=True, return_lse=True)
    assert not lse.requires_grad
    q.grad = None
    (o3.sum() * 0 + q.sum()).backward()  # o3 in the graph with a zero gradient
    assert torch.equal(q.grad, torch.ones_like(q))
