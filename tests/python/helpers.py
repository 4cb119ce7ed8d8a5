"""Test helpers shared by the torch tests: the example's PyTorch attention (the reference)
and per-strategy groups and shards."""

import importlib.util
import os

import torch

import distattn

_EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "train_zigzag.py")
_spec = importlib.util.spec_from_file_location("train_zigzag", _EXAMPLE)
train_zigzag = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_zigzag)

torch_attention = train_zigzag.torch_attention  # SDPA where torch has it, softmax(QK^T)V else


def group_for(world, mesh, strategy):
    return mesh if strategy == "hybrid" else world


def problem(world, mesh, strategy, b, s, h, hkv, d):
    g = distattn.as_group(group_for(world, mesh, strategy))
    return g, g.layout(strategy), g.layout_rank(strategy), distattn.Shape(b, s, h, hkv, d)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def gather_kv_grad(world, layout, shape, rank, local, like):
    """Every rank's dk/dv summed into the full tensor (heads: replicated heads add up)."""
    full = torch.zeros(like.shape, dtype=torch.float32)
    distattn.unshard_into(layout, shape, rank, "kv", local.float(), full, accumulate=True)
    world.all_reduce(full)
    return full
