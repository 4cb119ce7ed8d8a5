"""Timings of the distattn Python package (docs/PERFORMANCE.md, "Python package").

  overhead  per-call cost of the Python layer: wall time of a call minus the time of the
            C++ call inside it (Stats.call_s: the binding times sp_attention_forward/backward
            from entry to return, checks included, with the GIL released), for the
            low-level API and for distattn.torch.attention fwd / fwd+bwd; and PyTorch's own
            cost of an autograd.Function of the same form that does nothing.
  sp        distattn.torch.attention forward+backward per iteration, timed as
            `distattn-bench sp` times its C++ calls (max over ranks of each rank's mean
            after warm-up), for the same shapes.
  train     one step (forward, backward, gradient all-reduce, Adam) of the toy transformer
            of examples/train_zigzag.py with distattn zigzag attention, and with a
            PyTorch-only context-parallel alternative that runs on CPU (all-gather K/V
            with torch.distributed over gloo, then PyTorch attention with a causal mask by
            global positions: Llama 3 style), same layout, model and data.

Run under mpirun, e.g. NP=2 launch/mpirun.sh .venv/bin/python scripts/bench_python.py sp
--seq 32K --causal. Rank 0 prints a #-prefixed table.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys
import time

import numpy as np
import torch

import distattn
import distattn.torch as dt


def size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1024, "M": 1024 * 1024}.get(text[-1:], 1)
    return int(text[:-1] if mult > 1 else text) * mult


def max_over_ranks(world, x: float) -> float:
    buf = np.array([x], np.float64)
    world.all_reduce(buf, op="max")
    return float(buf[0])


class Recorder:
    """Stands in for distattn._distattn inside distattn.torch and sums the C++ time
    (Stats.call_s) of every sp_attention_forward/backward call (distattn.torch's SavedCall
    forward and backward included)."""

    def __init__(self, real):
        self.real, self.cpp_s = real, 0.0

    def __getattr__(self, name):
        return getattr(self.real, name)

    def sp_attention_forward(self, *a, **kw):
        st = self.real.sp_attention_forward(*a, **kw)
        self.cpp_s += st.call_s
        return st

    def sp_attention_backward(self, *a, **kw):
        st = self.real.sp_attention_backward(*a, **kw)
        self.cpp_s += st.call_s
        return st

    def sp_attention_forward_saved(self, *a, **kw):  # distattn.torch's forward
        call = self.real.sp_attention_forward_saved(*a, **kw)
        self.cpp_s += call.stats.call_s
        return _RecordedCall(self, call)


class _RecordedCall:
    """A SavedCall whose backward's Stats.call_s goes to the Recorder."""

    def __init__(self, rec, call):
        self.rec, self.call = rec, call

    def backward(self, *a, **kw):
        st = self.call.backward(*a, **kw)
        self.rec.cpp_s += st.call_s
        return st


def timed(world, fn, warmup: int, iters: int):
    """fn() after `warmup` untimed calls, `iters` times, each started together on all ranks;
    returns the wall seconds and fn's results."""
    for _ in range(warmup):
        fn()
    walls, results = [], []
    for _ in range(iters):
        world.barrier()
        t0 = time.perf_counter()
        results.append(fn())
        walls.append(time.perf_counter() - t0)
    return walls, results


class _Noop(torch.autograd.Function):
    """The autograd skeleton of distattn.torch.attention with no work: new out and lse,
    five saved tensors, three new gradients."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = torch.empty_like(q), torch.empty(q.shape[0], q.shape[2], q.shape[1])
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def local_inputs(world, strategy, b, s, h, d, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed + world.rank())
    sl = distattn.local_seq_len(distattn.Layout(strategy, world.size()), s)
    mk = lambda: torch.randn(b, sl, h, d, generator=g).requires_grad_(requires_grad)
    return mk(), mk(), mk()


def cmd_overhead(args, world):
    rec = Recorder(dt._C)
    dt._C = rec
    if world.rank() == 0:
        print(f"# Python overhead per call: {world.size()} rank(s), {args.strategy}, causal "
              f"{int(args.causal)}, fp32, batch {args.batch}, heads {args.heads}, dim "
              f"{args.dim}; median of {args.iters} calls after {args.warmup}; torch "
              f"{torch.__version__}")
        print(f"# {'seq':>6} {'path':<34} {'wall_us':>11} {'cpp_us':>11} {'overhead_us':>11} "
              f"{'overhead%':>9}")
    for s in [size(x) for x in args.seqs.split(",")]:
        q, k, v = local_inputs(world, args.strategy, args.batch, s, args.heads, args.dim)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[0], q.shape[2], q.shape[1])
        dout = torch.randn(q.shape)
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

        def lowlevel_torch():
            return distattn.sp_attention_forward(args.strategy, world, q, k, v, out, lse,
                                                 causal=args.causal).call_s

        qn, kn, vn, on, ln = (x.numpy() for x in (q, k, v, out, lse))

        def lowlevel_numpy():
            return distattn.sp_attention_forward(args.strategy, world, qn, kn, vn, on, ln,
                                                 causal=args.causal).call_s

        def torch_fwd():
            rec.cpp_s = 0.0
            with torch.no_grad():
                dt.attention(q, k, v, strategy=args.strategy, group=world, causal=args.causal)
            return rec.cpp_s

        def torch_fwd_bwd():
            rec.cpp_s = 0.0
            o = dt.attention(qg, kg, vg, strategy=args.strategy, group=world,
                             causal=args.causal)
            o.backward(dout)
            qg.grad = kg.grad = vg.grad = None
            return rec.cpp_s

        def noop_fwd_bwd():  # PyTorch's own cost of a custom Function of the same form
            o, _ = _Noop.apply(qg, kg, vg)
            o.backward(dout)
            qg.grad = kg.grad = vg.grad = None
            return 0.0

        for name, fn in [("sp_attention_forward(torch)", lowlevel_torch),
                         ("sp_attention_forward(numpy)", lowlevel_numpy),
                         ("distattn.torch.attention fwd", torch_fwd),
                         ("distattn.torch.attention fwd+bwd", torch_fwd_bwd),
                         ("no-op autograd.Function fwd+bwd", noop_fwd_bwd)]:
            walls, cpps = timed(world, fn, args.warmup, args.iters)
            wall = max_over_ranks(world, statistics.median(walls)) * 1e6
            over = max_over_ranks(world, statistics.median(
                [w - c for w, c in zip(walls, cpps)])) * 1e6
            cpp = wall - over
            pct = f"{100 * over / cpp:>8.2f}%" if cpp > 0 else f"{'-':>9}"
            if world.rank() == 0:
                print(f"  {s:>6} {name:<34} {wall:>11.1f} {cpp:>11.1f} {over:>11.1f} {pct}")
                sys.stdout.flush()


def cmd_sp(args, world):
    rec = Recorder(dt._C)
    dt._C = rec
    s = size(args.seq)
    q, k, v = local_inputs(world, args.strategy, args.batch, s, args.heads, args.dim, True)
    dout = torch.randn(q.shape)

    def step():
        rec.cpp_s = 0.0
        o = dt.attention(q, k, v, strategy=args.strategy, group=world, causal=args.causal)
        if args.backward:
            o.backward(dout)
            q.grad = k.grad = v.grad = None
        return rec.cpp_s

    times, cpps = timed(world, step, args.warmup, args.iters)
    ms = max_over_ranks(world, statistics.mean(times)) * 1e3
    cpp_ms = max_over_ranks(world, statistics.mean(cpps)) * 1e3
    if world.rank() == 0:
        print(f"# distattn.torch.attention: {world.size()} ranks, cpu, fp32, batch {args.batch},"
              f" heads {args.heads}/{args.heads}, dim {args.dim}, causal {int(args.causal)}, "
              f"{'fwd+bwd' if args.backward else 'fwd'}, iters {args.iters} warmup "
              f"{args.warmup}; torch {torch.__version__}; cpp_ms = the C++ calls inside")
        print(f"# {'strategy':<10} {'seq':>8} {'time_ms':>10} {'cpp_ms':>10}")
        print(f"  {args.strategy:<10} {s:>8} {ms:>10.3f} {cpp_ms:>10.3f}")


def load_example():
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "train_zigzag.py")
    spec = importlib.util.spec_from_file_location("train_zigzag", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def allgather_kv_attention(pos_all: torch.Tensor):
    """PyTorch-only context parallelism: all-gather K and V over torch.distributed
    (autograd-aware), put the rows at their global positions, attend with a causal mask by
    global positions. pos_all [P, Sl]: every rank's positions."""
    from torch.distributed.nn.functional import all_gather

    order = torch.argsort(pos_all.reshape(-1))

    def attn(q, k, v):
        me = torch.distributed.get_rank()
        kf = torch.cat(all_gather(k), dim=1)[:, order]  # [B, S, H, D] in global order
        vf = torch.cat(all_gather(v), dim=1)[:, order]
        qt, kt, vt = (x.transpose(1, 2) for x in (q, kf, vf))
        scores = qt @ kt.transpose(-1, -2) / math.sqrt(q.shape[-1])
        mask = pos_all[me][:, None] < torch.arange(kf.shape[1])[None, :]
        scores = scores.masked_fill(mask, float("-inf"))
        return (torch.softmax(scores, dim=-1) @ vt).transpose(1, 2)

    return attn


def cmd_train(args, world):
    ex = load_example()
    targs = ex.parser().parse_args(["--seq", str(size(args.seq)), "--dim", str(args.model_dim),
                                    "--heads", str(args.heads), "--kv-heads", str(args.heads),
                                    "--batch", str(args.batch), "--steps", "1"])
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dt.init_process_group(world, "gloo", host="127.0.0.1")
    s = targs.seq
    layout = distattn.Layout("zigzag", world.size())
    pos_all = torch.tensor([distattn.token_positions(layout, s, r) for r in range(world.size())])
    impls = {
        "distattn zigzag": lambda q, k, v: dt.attention(q, k, v, strategy="zigzag",
                                                        group=world, causal=True),
        "pytorch all-gather KV (gloo)": allgather_kv_attention(pos_all),
    }
    tok, tgt = ex.make_data(1, targs.batch, s, targs.vocab, targs.seed)[0]
    (tok_l, tgt_l), pos = dt.shard_batch([tok, tgt], "zigzag", world)
    if world.rank() == 0:
        print(f"# training step of examples/train_zigzag.py's model: {world.size()} ranks, "
              f"seq {s} (zigzag shards), batch {targs.batch}, dim {targs.dim}, heads "
              f"{targs.heads}, {targs.layers} layers, fp32; mean of {args.iters} steps after "
              f"{args.warmup}; torch {torch.__version__}")
        print(f"# {'attention':<30} {'step_ms':>10} {'loss':>10}")
    for name, attn in impls.items():
        model = ex.make_model(targs)
        opt = torch.optim.Adam(model.parameters(), lr=targs.lr)
        params = list(model.parameters())

        def step():
            logits = model(tok_l, pos, attn)
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, targs.vocab), tgt_l.reshape(-1), reduction="sum") / (
                    targs.batch * s)
            opt.zero_grad()
            loss.backward()
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            world.all_reduce(flat)
            at = 0
            for p in params:
                p.grad.copy_(flat[at:at + p.numel()].view_as(p))
                at += p.numel()
            opt.step()
            return loss.item()

        times, losses = timed(world, step, args.warmup, args.iters)
        loss = losses[-1]
        ms = max_over_ranks(world, statistics.mean(times)) * 1e3
        if world.rank() == 0:
            print(f"  {name:<30} {ms:>10.2f} {loss:>10.4f}")
            sys.stdout.flush()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["overhead", "sp", "train"])
    p.add_argument("--strategy", default="zigzag")
    p.add_argument("--seqs", default="128,1K,8K", help="overhead: global sequence lengths")
    p.add_argument("--seq", default="32K", help="sp, train: global sequence length")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128, help="head dim (overhead, sp)")
    p.add_argument("--model-dim", type=int, default=256, help="train: model width")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--backward", action="store_true", help="sp: also time the backward")
    p.add_argument("-n", "--iters", type=int, default=20)
    p.add_argument("-w", "--warmup", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    world = distattn.init()
    {"overhead": cmd_overhead, "sp": cmd_sp, "train": cmd_train}[args.command](args, world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
