"""Runs the distattn Python tests on every rank of an MPI job (mpirun -np N python
run_pytest.py [pytest args]). Rank 0 prints pytest's report; other ranks print theirs only
when they fail (prefixed with the rank). The exit status is pytest's, so mpirun fails the
job when any rank fails. --no-torch makes `import torch` fail in this process (the package
must import and work without torch)."""

import io
import os
import sys


def main() -> int:
    args = sys.argv[1:]
    if "--no-torch" in args:
        args.remove("--no-torch")
        sys.modules["torch"] = None  # `import torch` now raises ImportError
        os.environ["DISTATTN_TEST_NO_TORCH"] = "1"
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMIX_RANK", "0")))
    here = os.path.dirname(os.path.abspath(__file__))
    import pytest

    argv = ["-p", "no:cacheprovider", "-q", "--color=no", "--rootdir", here] + (args or [here])
    if rank == 0:
        return int(pytest.main(argv))
    captured = io.StringIO()
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = captured
    try:
        rc = int(pytest.main(argv))
    finally:
        sys.stdout, sys.stderr = stdout, stderr
    if rc != 0:
        for line in captured.getvalue().splitlines():
            print(f"[rank {rank}] {line}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
