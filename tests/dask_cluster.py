"""A dask.distributed cluster on this machine for tests and benchmarks: a scheduler and N single-threaded workers,
each its own process (Dask's own command-line entry points), bound to 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


@contextlib.contextmanager
def local_cluster(workers: int = 2, threads: int = 1, timeout: float = 60.0):
    """Yields the scheduler's tcp address once `workers` workers have joined; stops every process afterwards."""
    from distributed import Client

    with tempfile.TemporaryDirectory(prefix="dask-") as tmp:
        tmp = Path(tmp)
        scheduler_file = tmp / "scheduler.json"
        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0"]
                + ["--scheduler-file", str(scheduler_file), "--no-dashboard"],
                **quiet,
            )
        ]
        try:
            deadline = time.time() + timeout
            while not scheduler_file.exists():
                if time.time() > deadline or procs[0].poll() is not None:
                    raise RuntimeError("the dask scheduler did not start")
                time.sleep(0.2)
            address = json.loads(scheduler_file.read_text())["address"]
            for i in range(workers):
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", str(threads)]
                        + ["--host", "127.0.0.1", "--name", f"w{i}", "--local-directory", str(tmp / f"w{i}")]
                        + ["--no-dashboard"],
                        **quiet,
                    )
                )
            with Client(address, timeout=timeout) as client:
                client.wait_for_workers(workers, timeout=timeout)
            yield address
        finally:
            for p in procs[::-1]:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
