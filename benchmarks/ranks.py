"""Start ``world`` spawned worker processes on one free port and collect one report from each.

Shared by the 2-rank benchmarks. A worker is ``target(rank, port, *args, q)`` and ends by
``q.put((rank, *report))``. A worker that dies before reporting ends the wait with an
error naming its rank (instead of waiting out the queue's timeout).
"""

from __future__ import annotations

import queue
import socket
from typing import Any, Callable, Dict, Tuple


def run_ranks(target: Callable[..., None], *args: Any, world: int = 2) -> Dict[int, Tuple[Any, ...]]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, port, *args, q)) for r in range(world)]
    for p in procs:
        p.start()
    reports: Dict[int, Tuple[Any, ...]] = {}
    try:
        while len(reports) < world:
            try:
                rank, *report = q.get(timeout=5)
                reports[rank] = tuple(report)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise SystemExit(f"rank(s) {dead} died (exit codes {[procs[r].exitcode for r in dead]}); "
                                     "see their traceback above") from None
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return reports
