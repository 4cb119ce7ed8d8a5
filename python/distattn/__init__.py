"""distattn: distributed exact attention across ranks (Python skin over the C++ library).

Every check, every strategy and all communication run in C++; this package holds names,
docstrings and type hints. Arrays cross through DLPack (``__dlpack__`` /
``__dlpack_device__``: torch, NumPy, CuPy, JAX) without copies: outputs are written in place
into the arrays you pass. ``distattn::Error`` arrives as :class:`Error` (or a subclass by
status) with the C++ message.

Layout is BSHD as in flash-attn: ``q [batch, seq, heads_q, head_dim]``,
``k, v [batch, seq, heads_kv, head_dim(_v)]``, last dim contiguous (other strides free),
``lse`` fp32 ``[batch, heads_q, seq]`` (natural log). What a rank's *local* tensors hold
depends on the strategy (``S`` global sequence, ``P`` ranks, ``C = S / (2P)``):

============  ===============================================================================
heads         query heads ``split_heads(Hq, P, r)`` of the FULL sequence, and the KV heads
              those queries use (replicated when Hkv < P); pass the global ``heads_q`` and
              ``heads_kv``
ring          tokens ``[r*S/P, (r+1)*S/P)``, all heads
zigzag        chunk ``r`` then chunk ``2P-1-r`` of 2P chunks (rows ``[0,C)`` and ``[C,2C)``)
ulysses       contiguous tokens as ring, all heads (all-to-all to heads inside)
allgather     zigzag layout
hybrid        ring degree R x Ulysses degree U over ``DeviceMesh(world, [("ring", R),
              ("ulysses", U)])``: zigzag over the ring, sub-chunk ``u`` of each chunk
============  ===============================================================================

:func:`token_positions` gives the global position of each local row (RoPE), :func:`shard`
and :func:`unshard_into` convert between full tensors and a rank's shard.

Quick start (``mpirun -np 2 python script.py``)::

    import distattn, numpy as np
    world = distattn.init()                       # MPI world (initializes MPI itself)
    pos = distattn.token_positions("zigzag", 1024, world.size(), world.rank())
    distattn.sp_attention_forward("zigzag", world, q, k, v, out, lse, causal=True)

PyTorch: :mod:`distattn.torch` (imported on first use; ``import distattn`` never imports
torch).
"""

from __future__ import annotations

import atexit as _atexit
import importlib as _importlib
from typing import Any, Optional, Sequence, Tuple, Union

from . import _distattn as _C
from ._distattn import (
    Communicator,
    DeviceMesh,
    Error,
    Group,
    InvalidArgumentError,
    Layout,
    RemoteError,
    RuntimeInfo,
    Shape,
    Stats,
    TimeoutError,
    UnsupportedError,
    built_with_cuda,
    built_with_nccl,
    check_layout,
    cuda_device_count,
    local_kv_heads,
    local_query_heads,
    local_seq_len,
    nccl_unique_id,
    parse_strategy,
    rank_forward_flops,
    runtime_info,
    split_heads,
    strategies,
    token_positions,
    unshard_into,
    view_info,
)

__all__ = [
    "Communicator", "DeviceMesh", "Error", "Group", "InvalidArgumentError", "Layout",
    "RemoteError", "RuntimeInfo", "Shape", "Stats", "TimeoutError", "UnsupportedError",
    "as_group", "built_with_cuda", "built_with_nccl", "check_layout", "cuda_device_count",
    "finalize", "init", "local_kv_heads", "local_query_heads", "local_seq_len",
    "nccl_unique_id", "parse_strategy", "rank_forward_flops", "runtime_info", "shard",
    "sp_attention_backward", "sp_attention_forward", "split_heads", "strategies",
    "token_positions", "unshard_into", "view_info", "world",
]

__version__ = "0.1.0"

GroupLike = Union[None, Communicator, DeviceMesh, Group]

_world: Optional[Communicator] = None
_flat_group: Tuple[Any, Any] = (None, None)  # as_group's last (communicator, flat Group)
_finalize_registered = False


def init(device: Optional[str] = None, backend: str = "auto", verbose: bool = False) -> Communicator:
    """Initializes the runtime (MPI, once) and returns the world communicator.

    Under ``mpirun``/``srun`` every process calls it; without a launcher it is a 1-rank world.
    ``device``: ``None`` or ``"cpu"`` (MPI over host memory) or ``"cuda"`` (binds GPU
    ``local_rank % visible GPUs``; ``backend="auto"`` picks NCCL when every rank has its own
    GPU, else MPI staging through the host). Later calls return the same communicator.
    MPI is finalized at interpreter exit (:func:`finalize`).

    Returns the world :class:`Communicator` (``world.rank()``, ``world.size()``).
    """
    global _world, _finalize_registered
    if _world is not None:
        return _world
    use_gpu = device is not None and device.startswith("cuda")
    _C.runtime_init(use_gpu=use_gpu, verbose=verbose)
    if not _finalize_registered:
        _atexit.register(finalize)
        _finalize_registered = True
    _world = _C.create_world(backend, None if device is None else _C.runtime_info().device)
    return _world


def world() -> Communicator:
    """The world communicator of :func:`init` (initializing with defaults if needed)."""
    return _world if _world is not None else init()


def finalize() -> None:
    """Releases the world communicator and finalizes MPI if distattn initialized it.

    Registered with :mod:`atexit` by :func:`init`; MPI cannot be initialized again after it.
    """
    global _world, _flat_group
    _world = None
    _flat_group = (None, None)  # as_group's cache holds a communicator
    if _C.runtime_initialized():
        _C.runtime_finalize()


def as_group(group: GroupLike) -> Group:
    """The :class:`Group` a strategy runs over: ``None`` = the world (flat),
    a :class:`Communicator` = flat over it, a :class:`DeviceMesh` = its ``ring`` and
    ``ulysses`` axes (hybrid), a :class:`Group` as is."""
    global _flat_group
    if isinstance(group, Group):
        return group
    comm = world() if group is None else group
    if comm is _flat_group[0]:
        return _flat_group[1]
    if isinstance(comm, Communicator):
        # One entry: a trainer passes the same communicator on every call.
        _flat_group = (comm, Group.flat(comm))
        return _flat_group[1]
    if isinstance(group, DeviceMesh):
        return Group.from_mesh(group)
    raise InvalidArgumentError(
        f"group must be None (the world), a distattn.Communicator, a distattn.DeviceMesh or a "
        f"distattn.Group; got {type(group).__name__}")


def _like(result: Any, like: Any) -> Any:
    """result (a DLPack array) as the framework of `like` (torch / numpy), without a copy."""
    mod = type(like).__module__.split(".")[0]
    if mod in ("torch", "numpy", "cupy", "jax"):
        return _importlib.import_module(mod if mod != "jax" else "jax.dlpack").from_dlpack(result)
    return result


def shard(layout: Layout, shape: Shape, rank: int, role: str, full: Any) -> Any:
    """Rank ``rank``'s shard of a full tensor, as a new packed array of full's framework.

    ``role``: ``"query"`` (q, out, dout, dq ``[B, S, Hq, D]``), ``"kv"`` (k, v, dk, dv
    ``[B, S, Hkv, D]``) or ``"lse"`` (fp32 ``[B, Hq, S]``). ``shape`` gives the GLOBAL extents
    (heads strategy: both head counts). The result is returned as a torch tensor / NumPy
    array when ``full`` is one (zero-copy over the new buffer), else as a DLPack array.
    """
    return _like(_C.shard(layout, shape, rank, role, full), full)


def sp_attention_forward(strategy: str, group: GroupLike, q: Any, k: Any, v: Any, out: Any,
                         lse: Any, *, causal: bool = False, softmax_scale: Optional[float] = None,
                         heads_q: int = 0, heads_kv: int = 0, stream: int = 0,
                         drive_progress: bool = True, cu_seqlens: Optional[Any] = None,
                         window_left: int = -1, window_right: int = -1, sink_tokens: int = 0,
                         sinks: Any = None) -> Stats:
    """``out, lse`` <- exact attention of the local queries over ALL keys of the global sequence.

    Packed documents, windows and sinks: ``cu_seqlens`` (the GLOBAL int offsets of the packed
    sequence, batch 1; shard with a ``Shape`` whose ``cu_seqlens`` is set), ``window_left`` /
    ``window_right`` (document positions, -1 unlimited), ``sink_tokens`` and ``sinks`` (fp32
    ``[heads_q]`` learned sink logits), as ``SpOptions`` in C++.

    ``q [B, Sl, Hl, D]``, ``k, v [B, Sl, Hkvl, D/Dv]`` are this rank's local shards (see the
    package docstring for what local means per strategy), ``out [B, Sl, Hl, Dv]`` (q's dtype
    or fp32) and ``lse`` fp32 ``[B, Hl, Sl]`` are written in place. Storage fp32/bf16/fp16.
    ``softmax_scale`` defaults to ``1/sqrt(D)``; ``heads_q``/``heads_kv``: global head counts
    (heads strategy only); ``stream``: the CUDA stream (``cudaStream_t`` as int) for CUDA
    tensors. Collective over the group. Returns this rank's :class:`Stats`.
    """
    return _C.sp_attention_forward(strategy, as_group(group), q, k, v, out, lse, causal=causal,
                                   softmax_scale=softmax_scale, heads_q=heads_q,
                                   heads_kv=heads_kv, stream=stream,
                                   drive_progress=drive_progress,
                                   cu_seqlens=None if cu_seqlens is None else [int(x) for x in cu_seqlens],
                                   window_left=window_left, window_right=window_right,
                                   sink_tokens=sink_tokens, sinks=sinks)


def sp_attention_backward(strategy: str, group: GroupLike, q: Any, k: Any, v: Any, out: Any,
                          dout: Any, lse: Any, dq: Any, dk: Any, dv: Any, *,
                          causal: bool = False, softmax_scale: Optional[float] = None,
                          heads_q: int = 0, heads_kv: int = 0, stream: int = 0,
                          drive_progress: bool = True, cu_seqlens: Optional[Any] = None,
                          window_left: int = -1, window_right: int = -1, sink_tokens: int = 0,
                          sinks: Any = None, dsinks: Any = None) -> Stats:
    """``dq, dk, dv`` <- gradients for the local shards, from the forward's ``out`` and ``lse``.

    The mask arguments as :func:`sp_attention_forward`; with ``sinks``, ``dsinks`` (fp32
    ``[heads_q]``) receives their gradient, complete on every rank.

    Shapes as :func:`sp_attention_forward`; ``dout`` like ``out``; ``dq`` like ``q``,
    ``dk``/``dv`` like ``k``/``v`` (q's dtype or fp32), written in place. dk/dv are complete
    (summed over every rank's queries) except for the heads strategy's replicated KV heads,
    where they are this rank's contribution. Collective over the group.
    """
    return _C.sp_attention_backward(strategy, as_group(group), q, k, v, out, dout, lse, dq, dk,
                                    dv, causal=causal, softmax_scale=softmax_scale,
                                    heads_q=heads_q, heads_kv=heads_kv, stream=stream,
                                    drive_progress=drive_progress,
                                    cu_seqlens=None if cu_seqlens is None else [int(x) for x in cu_seqlens],
                                    window_left=window_left, window_right=window_right,
                                    sink_tokens=sink_tokens, sinks=sinks, dsinks=dsinks)


def __getattr__(name: str) -> Any:
    # `distattn.torch` imports torch only when it is first used.
    if name == "torch":
        return _importlib.import_module(".torch", __name__)
    raise AttributeError(f"module 'distattn' has no attribute {name!r}")
