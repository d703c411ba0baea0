"""The studio's one job queue: bounded, a fixed number of worker threads, progress, a time limit and cancellation.

A job is a function `work(ctx)` that reports progress through `ctx.progress(done, total, message)` and writes its
files under `ctx.dir` (one folder per job, named by its id, served only by id). Cancelling or running past the time
limit is noticed at the job's next progress call, which raises `Cancelled` inside the work: generation stops at the
next step, not after it finishes. A full queue refuses new work (`QueueFull`, which the API answers with 429)
instead of growing without bound.
"""

from __future__ import annotations

import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError


class QueueFull(Exception):
    """Every worker is busy and the waiting line is full."""


class Cancelled(Exception):
    """The job was cancelled or ran past its time limit."""


class JobNotFound(KeyError):
    pass


@dataclass
class Job:
    id: str
    kind: str
    params: dict
    dir: Path
    status: str = "queued"  # queued | running | done | failed | cancelled
    progress: float = 0.0
    message: str = "waiting for a worker"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: dict = field(default_factory=dict)
    error: str = ""
    cancel: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None

    def public(self) -> dict:
        files = (
            sorted(p.name for p in self.dir.iterdir() if p.is_file() and not p.name.startswith((".", "input")))
            if self.status == "done" and self.dir.is_dir()
            else []
        )
        return {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "progress": round(self.progress, 4),
            "message": self.message,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "result": self.result,
            "error": self.error,
            "files": files,
        }


class JobContext:
    """What a job's work function sees: its folder, its parameters, and the progress / cancellation hook."""

    def __init__(self, job: Job, worker: int):
        self.job, self.worker = job, worker

    @property
    def dir(self) -> Path:
        return self.job.dir

    @property
    def params(self) -> dict:
        return self.job.params

    def check(self) -> None:
        if self.job.cancel.is_set():
            raise Cancelled("cancelled")
        if self.job.deadline is not None and time.time() > self.job.deadline:
            raise Cancelled("ran past its time limit")

    def progress(self, done: float, total: float, message: str = "") -> None:
        self.check()
        self.job.progress = max(0.0, min(1.0, float(done) / float(total) if total else 0.0))
        if message:
            self.job.message = message


Work = Callable[[JobContext], dict]


class JobQueue:
    """`workers` threads take jobs from a line of at most `max_waiting`; finished jobs are kept (the newest
    `keep` of them) with their files under `root/<id>/`."""

    def __init__(
        self, root: str | Path, workers: int = 2, max_waiting: int = 8, time_limit_s: float = 600.0, keep: int = 200
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.time_limit_s = time_limit_s
        self.keep = keep
        self._line: queue.Queue = queue.Queue(maxsize=max_waiting)
        self._jobs: dict[str, Job] = {}
        self._work: dict[str, Work] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"studio-worker-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ API side
    def submit(
        self, kind: str, work: Work, params: dict | None = None, prepare: Callable[[Path], None] | None = None
    ) -> Job:
        job = Job(id=uuid.uuid4().hex, kind=kind, params=dict(params or {}), dir=self.root / "")
        job.dir = self.root / job.id
        job.dir.mkdir(parents=True)
        try:
            if prepare:
                prepare(job.dir)  # e.g. save an upload: before queueing, so a bad one is refused at once
            with self._lock:
                # recorded before it is queued: a worker may take the id the moment it is put
                self._jobs[job.id] = job
                self._work[job.id] = work
                try:
                    self._line.put_nowait(job.id)
                except queue.Full:
                    del self._jobs[job.id], self._work[job.id]
                    raise
        except queue.Full:
            shutil.rmtree(job.dir, ignore_errors=True)
            raise QueueFull(
                f"the studio is busy: {len(self._threads)} jobs are running and {self._line.maxsize} "
                f"are waiting; try again in a moment"
            ) from None
        except BaseException:
            shutil.rmtree(job.dir, ignore_errors=True)
            raise
        self._forget_old()
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        job.cancel.set()
        if job.status == "queued":
            job.status, job.message, job.finished = "cancelled", "cancelled before it started", time.time()
        return job

    def counts(self) -> dict:
        with self._lock:
            statuses = [j.status for j in self._jobs.values()]
        return {s: statuses.count(s) for s in ("queued", "running", "done", "failed", "cancelled")}

    def shutdown(self) -> None:
        self._stop.set()
        for job in list(self._jobs.values()):
            job.cancel.set()
        for _ in self._threads:
            try:
                self._line.put_nowait("")
            except queue.Full:
                break

    # ------------------------------------------------------------------ worker side
    def _run(self, worker: int) -> None:
        while not self._stop.is_set():
            job_id = self._line.get()
            if not job_id:
                continue
            job = self._jobs.get(job_id)
            work = self._work.pop(job_id, None)
            if job is None or work is None or job.status == "cancelled":
                continue
            job.status, job.started, job.message = "running", time.time(), "started"
            job.deadline = job.started + self.time_limit_s
            try:
                job.result = work(JobContext(job, worker)) or {}
                job.status, job.progress, job.message = "done", 1.0, "done"
            except Cancelled as e:
                job.status, job.message = "cancelled", str(e)
            except UserError as e:
                job.status, job.error = "failed", _one_line(e)
            except Exception as e:  # noqa: BLE001 - a job that breaks is reported, the worker goes on
                job.status, job.error = "failed", f"{type(e).__name__}: {_one_line(e)}"
            finally:
                job.finished = time.time()
                if job.status != "done":
                    for p in job.dir.glob("*"):
                        if p.is_file() and not p.name.startswith("input"):
                            p.unlink(missing_ok=True)

    def _forget_old(self) -> None:
        with self._lock:
            finished = sorted((j for j in self._jobs.values() if j.finished), key=lambda j: j.finished)
            for job in finished[: max(0, len(finished) - self.keep)]:
                self._jobs.pop(job.id, None)
                shutil.rmtree(job.dir, ignore_errors=True)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:400] if text else type(e).__name__
