"""Shared fixtures: the world communicator is built once per process (distattn.init()),
and helpers that make a result agree on every rank before a test asserts it."""

import os

import numpy as np
import pytest

import distattn

NO_TORCH = os.environ.get("DISTATTN_TEST_NO_TORCH") == "1"


@pytest.fixture(scope="session")
def world():
    return distattn.init()


def all_max(world, value: float) -> float:
    """The maximum of `value` over all ranks (so every rank passes or fails together)."""
    buf = np.array([value], dtype=np.float64)
    world.all_reduce(buf, op="max")
    return float(buf[0])


def all_true(world, ok: bool) -> bool:
    return all_max(world, 0.0 if ok else 1.0) == 0.0


def hybrid_mesh(world):
    """A ring x ulysses mesh over the world: ulysses 2 when the size is even."""
    u = 2 if world.size() % 2 == 0 else 1
    return distattn.DeviceMesh(world, [("ring", world.size() // u), ("ulysses", u)])
