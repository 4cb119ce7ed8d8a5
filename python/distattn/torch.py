"""distattn for PyTorch: context-parallel attention as a ``torch.autograd.Function``.

Imported on first use (``import distattn.torch`` or ``distattn.torch.attention``); importing
``distattn`` alone never imports torch. Works with torch >= 1.13 (CPU and CUDA tensors).

Tensors cross into C++ as DLPack capsules of the caller's storage: q, k, v, out, lse and the
gradients are never copied (a gradient that is not contiguous in its last dim is the one
exception: it is made contiguous, as the C++ kernels read rows).

Typical use in a trainer, replacing ``scaled_dot_product_attention`` on the rank's shard::

    import distattn, distattn.torch as dt
    world = distattn.init()
    (tokens, targets), pos = dt.shard_batch([tokens, targets], "zigzag")   # [B, S/P], [S/P]
    ...
    q, k, v = rope(q, pos), rope(k, pos), v                     # BSHD: [B, S/P, H, D]
    o = dt.attention(q, k, v, strategy="zigzag", causal=True)  # [B, S/P, H, D]

BHSD code (SDPA's layout) transposes views, which costs nothing (last dim stays
contiguous)::

    o = dt.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                     strategy="zigzag", causal=True).transpose(1, 2)
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed
from torch.utils.dlpack import to_dlpack as _to_dlpack

import distattn
from distattn import _distattn as _C

__all__ = [
    "attention", "init_process_group", "nccl_communicator", "position_ids", "shard_batch",
    "unshard_batch",
]

Tensors = Union[torch.Tensor, Sequence[torch.Tensor]]


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


_nccl_groups: dict = {}


def _group(group: Any) -> "distattn.Group":
    if isinstance(group, _C.Group):
        return group
    if group is None or isinstance(group, (_C.Communicator, _C.DeviceMesh)):
        return distattn.as_group(group)
    if isinstance(group, torch.distributed.ProcessGroup):
        key = id(group)
        if key not in _nccl_groups:
            _nccl_groups[key] = (group, _C.Group.flat(nccl_communicator(group)))
        return _nccl_groups[key][1]
    return distattn.as_group(group)  # raises, naming the accepted types


class _Attention(torch.autograd.Function):
    """forward: sp_attention_forward into new out/lse; backward: sp_attention_backward from
    the saved q, k, v, out, lse (the forward is not recomputed). The forward's DLPack imports
    are kept in a SavedCall, so the backward imports only dout and the three gradients."""

    @staticmethod
    def forward(ctx, q, k, v, strategy, group, causal, scale, heads_q, heads_kv, masks, sinks):
        if q.dim() == 4 and v.dim() == 4:
            # empty_like is the cheapest allocation from Python (~2x faster than torch.empty
            # with keyword arguments); a strided q gives out the same strides, which is fine.
            b, s, h, d = q.shape
            out = torch.empty_like(q) if v.shape[3] == d else q.new_empty((b, s, h, v.shape[3]))
            lse = q.new_empty((b, h, s), dtype=torch.float32)
        else:  # let the C++ checks name the tensor that is not 4-D
            out = lse = q
        stream = _stream(q)
        # keep_arrays=False: the SavedCall keeps only views of q, k, v, out, lse. Their memory
        # is held by autograd's saved tensors below, which the backward unpacks (alive while
        # it runs) and autograd frees right after it: a SavedCall holding them would keep them
        # until the graph is freed, and the next step would allocate fresh pages.
        if masks is None:
            call = _C.sp_attention_forward_saved(
                strategy, group, _to_dlpack(q), _to_dlpack(k), _to_dlpack(v), _to_dlpack(out),
                _to_dlpack(lse), causal, scale, heads_q, heads_kv, stream, True, None, -1, -1, 0,
                None, False)
        else:
            call = _C.sp_attention_forward_saved(
                strategy, group, _to_dlpack(q), _to_dlpack(k), _to_dlpack(v), _to_dlpack(out),
                _to_dlpack(lse), causal, scale, heads_q, heads_kv, stream, True,
                masks["cu_seqlens"], masks["window_left"], masks["window_right"],
                masks["sink_tokens"], None if sinks is None else _to_dlpack(sinks.detach()), False)
        # Also autograd's check that none of them was changed in place before the backward.
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.call = call
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zero gradient is made for lse
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        # Unpacked first: raises once autograd has freed them, and keeps the memory of the
        # SavedCall's views alive while it runs.
        q, k, v, _out, _lse, sinks = ctx.saved_tensors
        if dout is None:  # out did not reach the loss
            return (None,) * 11
        if dout.size(-1) > 1 and dout.stride(-1) != 1:
            dout = dout.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if sinks is None:
            ctx.call.backward(_to_dlpack(dout), _to_dlpack(dq), _to_dlpack(dk), _to_dlpack(dv),
                              _stream(q))
            return dq, dk, dv, None, None, None, None, None, None, None, None
        dsinks = torch.zeros(sinks.shape, dtype=torch.float32, device=sinks.device)
        ctx.call.backward(_to_dlpack(dout), _to_dlpack(dq), _to_dlpack(dk), _to_dlpack(dv),
                          _stream(q), _to_dlpack(dsinks))
        return dq, dk, dv, None, None, None, None, None, None, None, dsinks


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, strategy: str,
              group: Any = None, causal: bool = False, softmax_scale: Optional[float] = None,
              heads_q: Optional[int] = None, heads_kv: Optional[int] = None,
              return_lse: bool = False, cu_seqlens: Optional[Sequence[int]] = None,
              window: Tuple[int, int] = (-1, -1), sink_tokens: int = 0,
              sinks: Optional[torch.Tensor] = None
              ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Exact softmax attention of this rank's local queries over the keys of ALL ranks.

    Differentiable (a ``torch.autograd.Function``): the backward runs distattn's
    sp_attention_backward from the saved q, k, v, out and lse, without recomputing the
    forward. Collective: every rank of ``group`` calls it with its own shard, in the same
    order.

    Shapes and layout (BSHD, as flash-attn; NOT SDPA's BHSD)::

        q    [B, Sl, Hl,   D]     k [B, Sl, Hkvl, D]     v [B, Sl, Hkvl, Dv]
        out  [B, Sl, Hl,   Dv]    (q's dtype)            lse fp32 [B, Hl, Sl] (return_lse)

    Last dim contiguous, other strides free: views such as ``qkv[:, :, 0]`` of a fused
    ``[B, S, 3, H, D]`` projection, or ``x.transpose(1, 2)`` of a BHSD tensor, are used in
    place. dtype float32, bfloat16 or float16 (partials that cross ranks are fp32). GQA/MQA
    when ``Hq % Hkv == 0``: pass K/V with their own head count (no repeat_interleave).

    What the LOCAL tensors hold (S = global sequence, P = ranks in ``group``,
    C = S / (2P)); :func:`shard_batch` / :func:`position_ids` give the rows and positions:

    - ``heads``: the full sequence, query heads ``distattn.split_heads(Hq, P, rank)`` and the
      KV heads they use; pass the GLOBAL ``heads_q`` and ``heads_kv``. No communication.
      dk/dv of a KV head replicated over ranks (Hkv < P) is this rank's contribution.
    - ``ring``, ``ulysses``: tokens ``[rank*S/P, (rank+1)*S/P)``, all heads.
    - ``zigzag``, ``allgather``: chunks ``rank`` and ``2P-1-rank`` of 2P chunks
      (local rows ``[0, C)`` then ``[C, 2C)``), all heads; S % (2P) == 0. Use these for
      causal attention (balanced work).
    - ``hybrid``: ``group`` is a ``distattn.DeviceMesh`` with axes ``ring`` (R) and
      ``ulysses`` (U); zigzag over the ring, Ulysses rank u holds sub-chunk u of both chunks.

    ``group``: None (the world of ``distattn.init()``), a ``distattn.Communicator``, a
    ``distattn.DeviceMesh`` (hybrid), a ``distattn.Group``, or a ``torch.distributed``
    process group (CUDA tensors: an NCCL communicator is built once from it, see
    :func:`nccl_communicator`). ``causal`` masks by GLOBAL positions (so shards from other
    ranks mask correctly); ``softmax_scale`` defaults to ``1/sqrt(D)``. Strategy names are
    those of ``distattn.strategies()``. Bad input raises ``distattn.Error`` (a
    ``ValueError`` for bad arguments) with the C++ message.

    Packed documents, sliding windows and sinks: ``cu_seqlens`` (the GLOBAL int offsets of a
    packed batch, B = 1: a query sees only its own document, positions restart per document;
    shard with ``distattn.shard`` and a ``distattn.Shape`` whose ``cu_seqlens`` is set),
    ``window=(left, right)`` over document positions (-1: unlimited side), ``sink_tokens``
    (the first keys of each document ignore the window) and ``sinks``, fp32 ``[heads_q]``
    learned sink logits (gpt-oss style; their gradient flows back when they require it).

    Returns ``out`` (and ``lse`` when ``return_lse``).
    """
    masks = None
    if cu_seqlens is not None or tuple(window) != (-1, -1) or sink_tokens or sinks is not None:
        masks = {"cu_seqlens": None if cu_seqlens is None else [int(x) for x in cu_seqlens],
                 "window_left": int(window[0]), "window_right": int(window[1]),
                 "sink_tokens": int(sink_tokens)}
    out, lse = _Attention.apply(q, k, v, strategy, _group(group), causal, softmax_scale,
                                heads_q or 0, heads_kv or 0, masks, sinks)
    return (out, lse) if return_lse else out


def position_ids(strategy: str, global_seq: int, group: Any = None,
                 device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """Global positions (int64 ``[Sl]``) of this rank's local rows under ``strategy`` (RoPE)."""
    g = _group(group)
    pos = distattn.token_positions(g.layout(strategy), global_seq, g.layout_rank(strategy))
    return torch.tensor(pos, dtype=torch.int64, device=device)


def shard_batch(tensors: Tensors, strategy: str, group: Any = None, *,
                seq_dim: int = 1) -> Tuple[Any, torch.Tensor]:
    """This rank's rows of full-sequence tensors, and their global positions.

    ``tensors``: one tensor or a sequence of tensors with the global sequence along
    ``seq_dim`` (token ids ``[B, S]``, targets, hidden states ``[B, S, d]``, ...). Returns
    ``(shards, position_ids)``: the local rows in local order (a new tensor each, same type as
    the input: one tensor or a list) and int64 ``[Sl]`` positions on the first tensor's
    device. The heads strategy keeps the whole sequence on every rank.
    """
    single = isinstance(tensors, torch.Tensor)
    ts: List[torch.Tensor] = [tensors] if single else list(tensors)
    seq = ts[0].shape[seq_dim]
    for i, t in enumerate(ts):
        if t.shape[seq_dim] != seq:
            raise distattn.InvalidArgumentError(
                f"shard_batch: tensor {i} has {t.shape[seq_dim]} rows along dim {seq_dim} but "
                f"tensor 0 has {seq}; pass tensors of one global sequence")
    pos = position_ids(strategy, seq, group, device=ts[0].device)
    shards = [t.index_select(seq_dim, pos.to(t.device)) for t in ts]
    return (shards[0] if single else shards), pos


def _all_gather(comm: "distattn.Communicator", t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    out = torch.empty((comm.size(),) + tuple(t.shape), dtype=t.dtype, device=t.device)
    comm.all_gather(_to_dlpack(t), _to_dlpack(out), stream=_stream(t))
    return out


def unshard_batch(tensors: Tensors, strategy: str, group: Any = None, *,
                  seq_dim: int = 1) -> Any:
    """The reverse of :func:`shard_batch`: full-sequence tensors from every rank's rows.

    Collective over the group (all-gather); every rank gets the full tensors. Not
    differentiable (for outputs, logits, checks). The heads strategy returns the input.
    """
    single = isinstance(tensors, torch.Tensor)
    ts: List[torch.Tensor] = [tensors] if single else list(tensors)
    g = _group(group)
    layout = g.layout(strategy)
    if layout.strategy == "heads":
        return tensors
    comms = [g.seq] if layout.strategy != "hybrid" else [g.ulysses, g.seq]
    outs = []
    for t in ts:
        sl = t.shape[seq_dim]
        seq = sl * layout.ranks
        gathered = t
        for c in comms:  # hybrid: [R, U, ...] so that layout rank = r * U + u
            gathered = _all_gather(c, gathered)
        gathered = gathered.reshape((layout.ranks,) + tuple(t.shape))
        shape = list(t.shape)
        shape[seq_dim] = seq
        full = torch.empty(shape, dtype=t.dtype, device=t.device)
        for r in range(layout.ranks):
            pos = torch.tensor(distattn.token_positions(layout, seq, r), dtype=torch.int64,
                               device=t.device)
            full.index_copy_(seq_dim, pos, gathered[r])
        outs.append(full)
    return outs[0] if single else outs


def _broadcast_nccl_id(group: Any, make_id=None) -> bytes:
    """Rank 0 of ``group`` creates an NCCL id (``make_id``, default distattn.nccl_unique_id)
    and broadcasts it over the torch.distributed group; every rank returns the same bytes.
    A failure on rank 0 is broadcast too, so every rank raises instead of waiting."""
    make_id = make_id or distattn.nccl_unique_id
    dist = torch.distributed
    msg: List[Any] = [None]
    if dist.get_rank(group) == 0:
        try:
            msg[0] = (True, bytes(make_id()))
        except distattn.Error as e:
            msg[0] = (False, str(e))
    src = 0
    if group is not None and group is not dist.group.WORLD:
        get_global = getattr(dist, "get_global_rank", None) or \
            dist.distributed_c10d._get_global_rank  # torch < 2.0
        src = get_global(group, 0)
    dist.broadcast_object_list(msg, src=src, group=group)
    ok, payload = msg[0]
    if not ok:
        raise distattn.RemoteError(f"rank 0 of the process group could not create an NCCL id: "
                                   f"{payload}")
    return payload


def nccl_communicator(group: Any = None, device: Optional[int] = None) -> "distattn.Communicator":
    """An NCCL ``distattn.Communicator`` over a ``torch.distributed`` process group (GPU ranks
    launched by torchrun, no MPI): rank 0 creates the NCCL id, the group broadcasts it, every
    rank joins. ``device``: CUDA ordinal (default ``torch.cuda.current_device()``).
    Collective over the group."""
    dist = torch.distributed
    uid = _broadcast_nccl_id(group)
    dev = torch.cuda.current_device() if device is None else int(device)
    return _C.Communicator.from_nccl_id(uid, dist.get_rank(group), dist.get_world_size(group),
                                        dev)


def init_process_group(world: "distattn.Communicator", backend: str = "gloo",
                       host: Optional[str] = None) -> None:
    """Initializes ``torch.distributed`` over the ranks of a distattn communicator (an MPI
    job that also wants torch.distributed, e.g. for a gloo group): rank 0 picks a free TCP
    port on ``host`` (default: rank 0's hostname) and the address reaches the other ranks
    through ``world.broadcast``. Collective over ``world``."""
    import numpy as np
    import socket

    buf = np.zeros(264, np.uint8)  # port (8 bytes) + host name
    if world.rank() == 0:
        host = host or socket.gethostname()
        with socket.socket() as sk:
            sk.bind((host, 0))
            port = sk.getsockname()[1]
        raw = host.encode()[:256]
        buf[:8] = np.frombuffer(np.int64(port).tobytes(), np.uint8)
        buf[8:8 + len(raw)] = np.frombuffer(raw, np.uint8)
    world.broadcast(buf, root=0)
    port = int(np.frombuffer(buf[:8].tobytes(), np.int64)[0])
    host = bytes(buf[8:]).rstrip(b"\0").decode()
    torch.distributed.init_process_group(backend, init_method=f"tcp://{host}:{port}",
                                         rank=world.rank(), world_size=world.size())
