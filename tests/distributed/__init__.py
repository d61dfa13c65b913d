"""The kernels under PyTorch's distributed stack: DTensor sharding, context parallelism, the engines.

The tests here start gloo process groups on the CPU (marked ``slow`` and ``subprocess``), the ranks
started as torchrun starts them, with a time limit: ``launch`` runs ``python -m <test module>
CHECK...`` on every rank, whose ``__main__`` calls ``main`` with the module's table of checks.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(argv: list[str], world: int, timeout_s: float, interpret: bool = True) -> list[tuple[int, str]]:
    """``python argv`` on ``world`` ranks started as torchrun starts them (MASTER_ADDR/PORT, WORLD_SIZE,
    RANK, LOCAL_RANK; Triton's interpreter on when ``interpret``): [(exit status, output)] per rank.
    Past ``timeout_s`` every rank is killed and subprocess.TimeoutExpired raised."""
    environment = {
        **os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    if interpret:
        environment["TRITON_INTERPRET"] = "1"
    ranks = [
        subprocess.Popen(
            [sys.executable, *argv], env={**environment, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(world)
    ]
    deadline, logs = time.monotonic() + timeout_s, []
    try:
        for process in ranks:
            logs.append(process.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
    except subprocess.TimeoutExpired:
        for process in ranks:
            process.kill()
            process.communicate()
        raise
    return [(process.returncode, log) for process, log in zip(ranks, logs)]


def launch(module: str, checks: list[str], timeout_s: float = TIMEOUT_S) -> None:
    """Run ``checks`` of ``python -m module`` on WORLD gloo ranks (Triton's interpreter on); fail with
    every failed rank's log tail if any rank fails, or if they run past ``timeout_s``."""
    try:
        ranks = run_ranks(["-m", module, *checks], WORLD, timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{module} {checks}: ranks still running after {timeout_s} s")
    failed = [rank for rank, (status, _) in enumerate(ranks) if status != 0]
    if failed:
        tails = "\n".join(f"--- rank {rank}:\n{ranks[rank][1][-3000:]}" for rank in failed)
        pytest.fail(f"{module} {checks}: rank(s) {failed} failed\n{tails}")


def main(names: list[str], checks: dict[str, Callable]) -> None:
    """One rank: each named check, called with a 1-D mesh of the gloo group; the first failure ends it (exit 1)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for name in names:
            start = time.monotonic()
            checks[name](mesh)
            print(f"rank {dist.get_rank()}: {name} ok ({time.monotonic() - start:.1f} s)", flush=True)
        dist.barrier()  # every rank passed every check
    except BaseException:
        dist.destroy_process_group()
        raise
    # Every check passed on every rank: leave without Python's and gloo's teardown, which once ended a
    # rank whose checks had all passed with "terminate called without an active exception" (a C++
    # thread destroyed while joinable, after the functional collectives of the context-parallel checks).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
