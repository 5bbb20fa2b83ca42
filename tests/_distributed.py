"""Run a function on real processes joined by a gloo process group on this machine.

Rendezvous through a ``file://`` in a temporary folder; gloo is bound to the loopback
interface (``GLOO_SOCKET_IFNAME=lo``), so nothing leaves 127.0.0.1. Each rank's return
value comes back through ``torch.save``; a rank that raises sends back its traceback.
Every run is bounded in time: ranks still alive at the deadline are killed.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def _entry(
    target: Callable[..., Any],
    rank: int,
    world_size: int,
    folder: str,
    timeout_s: float,
    args: tuple[Any, ...],
) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    import torch.distributed as dist

    out = Path(folder) / f"rank{rank}.pt"
    code = 0
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{folder}/rendezvous",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        result = target(rank, world_size, *args)
        torch.save({"ok": result}, out)
    except BaseException:
        torch.save({"error": traceback.format_exc()}, out)
        code = 1
    finally:
        if dist.is_initialized():
            # Every rank done with every collective before any tears its connections down
            # (a rank leaving early can abort a peer's gloo threads). A dead peer makes
            # the barrier fail at once; that is fine here.
            try:
                dist.barrier()
            except Exception:
                pass
            dist.destroy_process_group()
    # Leave without the interpreter's teardown, where gloo's threads have been seen to
    # abort the process (std::terminate) after the result was written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_ranks(
    target: Callable[..., Any],
    world_size: int,
    folder: Path,
    *args: Any,
    deadline_s: float = 240.0,
    pg_timeout_s: float = 60.0,
) -> tuple[list[Any], list[int | None]]:
    """``target(rank, world_size, *args)`` on ``world_size`` processes; returns each rank's
    result (or ``{"error": traceback}`` / ``None`` if it left none) and exit codes."""
    folder.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(
            target=_entry,
            args=(target, rank, world_size, str(folder), pg_timeout_s, args),
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    end = time.monotonic() + deadline_s
    for proc in procs:
        proc.join(max(0.0, end - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    results: list[Any] = []
    for rank in range(world_size):
        path = folder / f"rank{rank}.pt"
        if not path.exists():
            results.append(None)
            continue
        saved = torch.load(path, weights_only=False)
        results.append(saved.get("ok", saved))
    return results, [proc.exitcode for proc in procs]


def unwrap(results: list[Any]) -> list[Any]:
    """The results, or an AssertionError that shows a rank's traceback."""
    for rank, result in enumerate(results):
        if result is None:
            raise AssertionError(f"rank {rank} left no result (killed or hung)")
        if isinstance(result, dict) and set(result) == {"error"}:
            raise AssertionError(f"rank {rank} raised:\n{result['error']}")
    return results
