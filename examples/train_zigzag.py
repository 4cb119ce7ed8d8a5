"""Train a toy 2-layer transformer with distattn's zigzag context parallelism and check
that its loss curve matches the same model trained in one process with PyTorch attention.

    NP=4 launch/mpirun.sh .venv/bin/python examples/train_zigzag.py [--steps 30]

Every rank holds the same weights and the zigzag shard of each sequence (rows r and 2P-1-r
of 2P chunks, with their global positions for RoPE); attention is distattn.torch.attention
(an autograd Function over sp_attention_forward/backward); everything else in the model is
per token, so the local loss is the sum over the rank's own tokens, and the weight gradients
are summed over ranks with distattn's all_reduce (data parallel over the sequence). Rank 0
then trains the same model on the full sequences in one process with PyTorch attention
(scaled_dot_product_attention where torch has it, softmax(QK^T)V otherwise) and prints both
curves. Exit status 1 when a step's losses differ by more than --tol (relative).
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

import distattn
import distattn.torch as dt

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def torch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """PyTorch's attention on BSHD tensors (SDPA when available)."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # BHSD
    if kt.shape[1] != qt.shape[1]:  # GQA: repeat KV heads for torch
        rep = qt.shape[1] // kt.shape[1]
        kt, vt = kt.repeat_interleave(rep, dim=1), vt.repeat_interleave(rep, dim=1)
    if hasattr(F, "scaled_dot_product_attention"):
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    else:
        s = qt @ kt.transpose(-1, -2) / math.sqrt(qt.shape[-1])
        if causal:
            n, m = s.shape[-2], s.shape[-1]
            mask = torch.ones(n, m, dtype=torch.bool, device=s.device).triu(1)
            s = s.masked_fill(mask, float("-inf"))
        o = torch.softmax(s, dim=-1) @ vt
    return o.transpose(1, 2)


def rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, S, H, D] at GLOBAL positions pos [S]."""
    d = x.shape[-1] // 2
    inv = 1.0 / (10000 ** (torch.arange(d, dtype=torch.float32) / d))
    ang = pos.to(torch.float32)[:, None] * inv[None, :]  # [S, d]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.ln1 = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.hd)
        self.proj = torch.nn.Linear(dim, dim)
        self.ln2 = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(),
                                       torch.nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, attn: AttnFn) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.qkv(self.ln1(x))
        q, k, v = qkv.split([self.heads * self.hd, self.kv_heads * self.hd,
                             self.kv_heads * self.hd], dim=-1)
        q = rope(q.reshape(b, s, self.heads, self.hd), pos)
        k = rope(k.reshape(b, s, self.kv_heads, self.hd), pos)
        v = v.reshape(b, s, self.kv_heads, self.hd)  # a strided view, used in place
        x = x + self.proj(attn(q, k, v).reshape(b, s, -1))
        return x + self.mlp(self.ln2(x))


class ToyLM(torch.nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, kv_heads: int, layers: int):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList(Block(dim, heads, kv_heads) for _ in range(layers))
        self.ln = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, attn: AttnFn) -> torch.Tensor:
        x = self.emb(tokens)
        for blk in self.blocks:
            x = blk(x, pos, attn)
        return self.head(self.ln(x))


def make_data(steps: int, batch: int, seq: int, vocab: int, seed: int):
    """Per step: tokens [B, S] and their next tokens [B, S] as targets. Half of each sequence
    follows x[t+1] = (5 x[t] + 3) mod vocab from a random start (learnable, so the loss
    falls), the other half repeats the first (predictable only by attending back, across
    ranks). A pure function of the seed: every rank builds the same batches."""
    g = torch.Generator().manual_seed(seed + 1)
    half = (seq + 2) // 2
    out = []
    for _ in range(steps):
        x = torch.randint(0, vocab, (batch, 1), generator=g)
        cols = [x]
        for _ in range(half - 1):
            cols.append((cols[-1] * 5 + 3) % vocab)
        first = torch.cat(cols, dim=1)
        tok = torch.cat([first, first], dim=1)[:, :seq + 1]
        out.append((tok[:, :-1].contiguous(), tok[:, 1:].contiguous()))
    return out


def make_model(args) -> ToyLM:
    torch.manual_seed(args.seed)
    return ToyLM(args.vocab, args.dim, args.heads, args.kv_heads, args.layers)


def train_distattn(args, world: Optional[distattn.Communicator] = None) -> List[float]:
    """Context-parallel training over `world` (default: distattn.init()); returns the global
    mean loss of each step (the same on every rank)."""
    world = world or distattn.init()
    model = make_model(args)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    tokens_total = args.batch * args.seq
    attn = lambda q, k, v: dt.attention(q, k, v, strategy=args.strategy, group=world,
                                        causal=True)
    losses = []
    for tok, tgt in make_data(args.steps, args.batch, args.seq, args.vocab, args.seed):
        (tok_l, tgt_l), pos = dt.shard_batch([tok, tgt], args.strategy, world)
        logits = model(tok_l, pos, attn)
        # Sum over this rank's tokens / all tokens of the batch: the ranks' losses add up to
        # the global mean, so summed gradients are the global mean's gradients.
        loss = F.cross_entropy(logits.reshape(-1, args.vocab), tgt_l.reshape(-1),
                               reduction="sum") / tokens_total
        opt.zero_grad()
        loss.backward()
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        world.all_reduce(flat)
        at = 0
        for p in model.parameters():
            n = p.numel()
            p.grad.copy_(flat[at:at + n].view_as(p))
            at += n
        opt.step()
        total = torch.tensor([loss.item()], dtype=torch.float64)
        world.all_reduce(total)
        losses.append(total.item())
    return losses


def train_reference(args) -> List[float]:
    """The same model and data in one process, with PyTorch attention."""
    model = make_model(args)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    pos = torch.arange(args.seq)
    attn = lambda q, k, v: torch_attention(q, k, v, causal=True)
    losses = []
    for tok, tgt in make_data(args.steps, args.batch, args.seq, args.vocab, args.seed):
        logits = model(tok, pos, attn)
        loss = F.cross_entropy(logits.reshape(-1, args.vocab), tgt.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--strategy", default="zigzag")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=96)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-4, help="max relative loss difference")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    torch.set_num_threads(1)
    world = distattn.init()
    dist = train_distattn(args, world)
    worst = 0.0
    if world.rank() == 0:
        ref = train_reference(args)
        print(f"# {args.strategy} over {world.size()} ranks vs one process with PyTorch "
              f"attention (torch {torch.__version__})")
        print(f"# {'step':>4} {'distattn':>12} {'pytorch':>12} {'rel diff':>10}")
        for i, (a, b) in enumerate(zip(dist, ref)):
            rel = abs(a - b) / abs(b)
            worst = max(worst, rel)
            print(f"  {i:>4} {a:>12.6f} {b:>12.6f} {rel:>10.2e}")
        verdict = "OK" if worst <= args.tol else "FAILED"
        print(f"# max relative difference {worst:.2e} (tolerance {args.tol:.0e}): {verdict}")
    bad = torch.tensor([1.0 if worst > args.tol else 0.0], dtype=torch.float64)
    world.all_reduce(bad, op="max")
    return 1 if bad.item() > 0 else 0


if __name__ == "__main__":
    sys.exit(main())
