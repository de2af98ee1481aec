"""Runs a test scenario in N gloo processes on localhost, bounded in time and always cleaned up.

``DistributedPool(world_size, tmp_dir).run("test_sync_bn:scenario_name", **kwargs)`` runs
``scenario_name(rank, world_size, **kwargs)`` on every rank of a gloo group of spawned processes and returns what
each rank returned, or raises with the failing rank's traceback. Failures and deadlines kill the processes.

``count_collectives()`` counts the torch.distributed collective calls made while it is active.
"""

from __future__ import annotations

import contextlib
import faulthandler
import importlib
import os
import queue as queue_module
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_reduce",
    "all_to_all",
    "barrier",
    "broadcast",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
)
COLLECTIVE_TIMEOUT_S = 60


def _worker(rank: int, world_size: int, init_file: str, tasks: Any, results: Any) -> None:
    """Joins the gloo group once, then runs (target, kwargs) tasks until it receives None."""
    faulthandler.enable()  # a crash in a kernel prints the Python stack of the rank on stderr
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((rank, "error", traceback.format_exc()))
        return
    try:
        while (task := tasks.get()) is not None:
            target, kwargs = task
            try:
                module_name, fn_name = target.split(":")
                fn = getattr(importlib.import_module(module_name), fn_name)
                results.put((rank, "ok", fn(rank, world_size, **kwargs)))
            except BaseException:  # noqa: BLE001 - the parent reports it
                results.put((rank, "error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()
    # Skip the interpreter's slow orderly shutdown (seconds of torch teardown on a loaded machine), once the
    # results have left.
    results.close()
    results.join_thread()
    os._exit(0)


class DistributedPool:
    """``world_size`` spawned processes in one gloo group (rendezvous through a FileStore: no port to race for),
    reused across scenarios so that the interpreter start-up (seconds on a loaded machine) is paid once.

    ``run("module:function", **kwargs)`` calls ``function(rank, world_size, **kwargs)`` on every rank and returns
    the results in rank order. The first failure or the deadline kills every process (the others may be blocked
    in a collective) and raises; the next ``run`` starts a fresh group. ``close()`` ends the processes (joined
    with a timeout, killed if still alive).
    """

    def __init__(self, world_size: int, tmp_dir: Path) -> None:
        self.world_size = world_size
        self.tmp_dir = tmp_dir
        self.procs: list[Any] = []
        self.tasks: list[Any] = []
        self.results: Any = None

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(self.world_size)]
        init_file = str(self.tmp_dir / f"store-{os.getpid()}-{time.monotonic_ns()}")
        self.procs = [
            ctx.Process(
                target=_worker, args=(rank, self.world_size, init_file, self.tasks[rank], self.results), daemon=True
            )
            for rank in range(self.world_size)
        ]
        for p in self.procs:
            p.start()

    def run(self, target: str, timeout: float = 60, **kwargs: Any) -> list[Any]:
        """Runs ``module:function`` on every rank; AssertionError with the failing rank's traceback, or
        TimeoutError after ``timeout`` seconds (counted from the call, start-up included)."""
        if not self.procs:
            self._start()
        ok = False
        try:
            for q in self.tasks:
                q.put((target, kwargs))
            out: dict[int, Any] = {}
            deadline = time.monotonic() + timeout
            while len(out) < self.world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(self.world_size)) - set(out))
                    raise TimeoutError(
                        f"{target}: no result from ranks {missing} of {self.world_size} after {timeout} s"
                    )
                try:
                    rank, status, payload = self.results.get(timeout=min(remaining, 0.5))
                except queue_module.Empty:
                    dead = [r for r, p in enumerate(self.procs) if p.exitcode is not None]
                    if not dead:
                        continue
                    try:  # a result may still be in the pipe
                        rank, status, payload = self.results.get(timeout=2)
                    except queue_module.Empty:
                        codes = [self.procs[r].exitcode for r in dead]
                        raise AssertionError(f"{target}: rank(s) {dead} exited with code(s) {codes}") from None
                if status == "error":
                    raise AssertionError(f"{target} failed on rank {rank} of {self.world_size}:\n{payload}")
                out[rank] = payload
            ok = True
            return [out[r] for r in range(self.world_size)]
        finally:
            if not ok:
                self.close(kill=True)

    def close(self, kill: bool = False) -> None:
        """Ends the processes: asks them to stop (unless ``kill``), joins with a timeout, kills what is left."""
        if not kill:
            for q in self.tasks:
                with contextlib.suppress(Exception):
                    q.put(None)
            for p in self.procs:
                if p.pid is not None:
                    p.join(timeout=10)
        for p in self.procs:
            if p.pid is not None:
                if p.is_alive():
                    p.kill()
                p.join(timeout=5)
        for q in [*self.tasks, self.results]:
            if q is not None:
                q.cancel_join_thread()
                q.close()
        self.procs, self.tasks, self.results = [], [], None


@contextlib.contextmanager
def count_collectives() -> Iterator[Counter]:
    """Counts calls of the torch.distributed collectives (by name) made through the module while active."""
    counts: Counter = Counter()
    saved = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return counted

    try:
        for name, fn in saved.items():
            setattr(dist, name, wrap(name, fn))
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
