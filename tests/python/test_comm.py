"""Bootstrap and communicators from Python: the MPI world, collectives over DLPack arrays,
split, DeviceMesh, the ledger, mpi4py communicators, and the NCCL id exchange over a
torch.distributed (gloo, CPU) process group."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as tdist

import distattn
import distattn.torch as dt
from conftest import all_true


def test_world_matches_mpi(world):
    MPI = pytest.importorskip("mpi4py.MPI")
    assert (world.rank(), world.size()) == (MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size())
    assert distattn.init() is world and world.backend == "mpi"
    info = distattn.runtime_info()
    assert info.rank == world.rank() and info.size == world.size() and info.device == "cpu"


def test_collectives_numpy_and_torch(world):
    p, r = world.size(), world.rank()
    x = np.full(5, r + 1, np.float32)
    world.all_reduce(x)
    assert np.all(x == p * (p + 1) / 2)
    t = torch.full((3,), float(r))
    m = torch.empty(3)
    world.all_reduce(t, m, op="max")  # torch tensors through their __dlpack__
    assert torch.all(m == p - 1)
    g = np.empty((p, 2), np.int64)
    world.all_gather(np.array([r, -r], np.int64), g)
    assert g[:, 0].tolist() == list(range(p))
    rs = np.empty(2, np.float64)
    world.reduce_scatter(np.ones(2 * p, np.float64), rs)
    assert np.all(rs == p)
    a2a = np.empty(p, np.int32)
    world.all_to_all(np.arange(p, dtype=np.int32) + 10 * r, a2a)
    assert a2a.tolist() == [10 * j + r for j in range(p)]
    b = np.array([r], np.float32)
    world.broadcast(b, root=p - 1)
    assert b[0] == p - 1
    if p > 1:
        nxt, prv = (r + 1) % p, (r - 1) % p
        got = np.empty(1, np.float32)
        if r % 2 == 0:
            world.send(np.array([r], np.float32), nxt)
            world.recv(got, prv)
        else:
            world.recv(got, prv)
            world.send(np.array([r], np.float32), nxt)
        assert got[0] == prv
    world.barrier()


def test_collective_errors_carry_cpp_message(world):
    with pytest.raises(distattn.InvalidArgumentError, match="all_gather"):
        world.all_gather(np.zeros(3, np.float32), np.zeros(3 * world.size() + 1, np.float32))
    with pytest.raises(distattn.InvalidArgumentError, match="unknown reduction 'avg'"):
        world.all_reduce(np.zeros(1, np.float32), op="avg")


def test_split_and_mesh(world):
    p, r = world.size(), world.rank()
    half = world.split(r % 2, key=r)
    assert half.size() == (p + 1 - r % 2) // 2 and half.rank() == r // 2
    none = world.split(None if r == 0 else 1)
    assert (none is None) == (r == 0)
    u = 2 if p % 2 == 0 else 1
    mesh = distattn.DeviceMesh(world, [("ring", p // u), ("ulysses", u)])
    assert mesh.axes == [("ring", p // u), ("ulysses", u)]
    assert mesh.coords() == [r // u, r % u] and mesh.rank_of(mesh.coords()) == r
    assert mesh.comm("ulysses").size() == u and mesh.comm("ring").rank() == r // u
    assert str(mesh) == f"ring={p // u} x ulysses={u}"
    g = distattn.Group.from_mesh(mesh)
    assert g.layout("hybrid").ranks == p and g.layout_rank("hybrid") == r
    with pytest.raises(distattn.InvalidArgumentError, match="ring"):
        mesh.comm("tp")


def test_ledger_counts_calls_and_bytes(world):
    c = world.split(0, key=world.rank())
    c.reset_ledger()
    assert c.ledger() == {}
    c.all_reduce(np.zeros(1000, np.float32))
    c.all_reduce(np.zeros(1000, np.float32))
    row = c.ledger()["all_reduce"]
    p = c.size()
    assert row["calls"] == 2 and row["seconds"] >= 0
    assert row["bytes_sent"] == 2 * int(2 * (p - 1) / p * 4000)
    assert "all_reduce calls=2" in c.ledger_summary()


def test_from_mpi4py(world):
    MPI = pytest.importorskip("mpi4py.MPI")
    c = distattn.Communicator.from_mpi4py(MPI.COMM_WORLD)
    assert (c.rank(), c.size()) == (world.rank(), world.size())
    sub = MPI.COMM_WORLD.Split(world.rank() % 2, world.rank())
    cs = distattn.Communicator.from_mpi4py(sub)
    x = np.ones(4, np.float64)
    cs.all_reduce(x)
    assert np.all(x == sub.Get_size())
    assert cs.rank() == sub.Get_rank()
    sub.Free()


@pytest.fixture(scope="module")
def gloo(world):
    """A torch.distributed gloo group over the same ranks (loopback)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dt.init_process_group(world, "gloo", host="127.0.0.1")
    assert tdist.get_world_size() == world.size() and tdist.get_rank() == world.rank()
    yield tdist.group.WORLD
    tdist.destroy_process_group()


def test_nccl_id_exchange_over_a_torch_process_group(world, gloo):
    made = []

    def make_id():
        made.append(os.urandom(128))
        return made[-1]

    uid = dt._broadcast_nccl_id(gloo, make_id)
    assert len(made) == (1 if world.rank() == 0 else 0)
    ids = np.empty((world.size(), len(uid)), np.uint8)
    world.all_gather(np.frombuffer(uid, np.uint8).copy(), ids)
    assert (ids == ids[0]).all() and len(uid) == 128



def test_nccl_id_failure_on_rank_0_reaches_every_rank(world, gloo):
    def fail():
        distattn.parse_strategy("no NCCL here")

    with pytest.raises(distattn.RemoteError, match="could not create an NCCL id"):
        dt._broadcast_nccl_id(gloo, fail)


def test_nccl_bootstrap_on_a_cpu_machine(world, gloo):
    """With NCCL built in, rank 0's real id crosses the group and joining fails cleanly
    without a GPU; without NCCL both calls say so."""
    if distattn.built_with_nccl():
        uid = dt._broadcast_nccl_id(gloo)
        assert len(uid) == 128
        if distattn.cuda_device_count() == 0:
            with pytest.raises(distattn.InvalidArgumentError, match="CUDA device"):
                distattn.Communicator.from_nccl_id(uid, world.rank(), world.size(), 0)
    else:
        with pytest.raises(distattn.UnsupportedError, match="built without NCCL"):
            distattn.nccl_unique_id()
        with pytest.raises(distattn.RemoteError, match="built without NCCL"):
            dt.nccl_communicator(gloo, device=0)
        with pytest.raises(distattn.UnsupportedError, match="built without NCCL"):
            distattn.Communicator.from_nccl_id(bytes(128), 0, 1, 0)
    with pytest.raises(distattn.InvalidArgumentError, match="has 5 bytes but must have 128"):
        distattn.Communicator.from_nccl_id(b"12345", 0, 1, 0)
    assert all_true(world, True)
