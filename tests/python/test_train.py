"""examples/train_zigzag.py: 30 training steps of a toy 2-layer transformer with zigzag
attention over the world give the loss curve of one process with PyTorch attention."""

import torch

from conftest import all_max
from helpers import train_zigzag


def test_zigzag_training_matches_single_process_pytorch(world):
    args = train_zigzag.parser().parse_args([])
    assert args.steps == 30 and args.strategy == "zigzag"
    dist = train_zigzag.train_distattn(args, world)
    ref = train_zigzag.train_reference(args)
    worst = max(abs(a - b) / abs(b) for a, b in zip(dist, ref))
    assert all_max(world, worst) <= 1e-4, (dist, ref)
    assert ref[-1] < 0.2 * ref[0]  # the curve moves: the comparison is not of flat lines
