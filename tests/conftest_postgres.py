"""Shared-registry fixtures: a throwaway PostgreSQL cluster (Debian's postgresql package, installed by `make
postgres`) on a free loopback port, and `mlflow server`s backed by it, the way a team runs its registry.

PostgreSQL refuses to run as root, so when the tests run as root (CI, containers) its commands run as the
`postgres` user the package creates, on a folder in /tmp handed to that user (pytest's own temp folders are
private to root). The cluster trades durability for speed (fsync off): it lives for one test session."""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest_registry import ServerHandle, _free_port, _settings

INSTALL_HINT = "run `make postgres` once (as root, or `sudo make postgres`): it installs Debian's postgresql"


def postgres_bin() -> Path:
    """The folder of Debian's PostgreSQL server programs (the newest installed version), else pg_ctl's on PATH."""

    def version(pg_ctl: Path) -> int:
        name = pg_ctl.parent.parent.name
        return int(name) if name.isdigit() else 0

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=version)
    if found:
        return found[-1].parent
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).resolve().parent
    pytest.fail(f"PostgreSQL is not installed (no pg_ctl): {INSTALL_HINT}", pytrace=False)


class PostgresServer:
    """One PostgreSQL cluster in `root`, listening on 127.0.0.1:`port` with trust authentication."""

    def __init__(self, root: Path, port: int):
        self.bin = postgres_bin()
        self.root, self.port = root, port
        self.data, self.log = root / "data", root / "postgres.log"
        self.as_postgres = os.getuid() == 0  # the server refuses to run as root
        if self.as_postgres:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail(f"no `postgres` user to run PostgreSQL as: {INSTALL_HINT}", pytrace=False)
            os.chown(root, user.pw_uid, user.pw_gid)

    def _run(self, program: str, *args: str, timeout: float = 60) -> None:
        cmd = [str(self.bin / program), *args]
        if self.as_postgres:
            script = f"cd {shlex.quote(str(self.root))} && exec {shlex.join(cmd)}"
            cmd = ["su", "postgres", "-s", "/bin/sh", "-c", script]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            log = self.log.read_text()[-1500:] if self.log.exists() else ""
            raise RuntimeError(f"{program} {' '.join(args[:2])} failed: {done.stderr.strip()[-1500:]}\n{log}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        # fsync and full-page writes off: a test cluster need not survive a power cut, and commits get cheap. It
        # still survives its own crash (`stop("immediate")`): each commit is written to the WAL before it returns
        # (synchronous_commit stays on; off, a crash loses the last commits, as a real server would not).
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """`immediate` is a crash: no checkpoint, clients cut off at once."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        con = psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        try:
            con.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with con.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            con.close()
        return self.url(name)

    def query(self, database: str, sql: str) -> list[tuple]:
        import psycopg

        con = psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=database)
        try:
            with con.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()
        finally:
            con.close()


class MlflowServer(ServerHandle):
    """An `mlflow server` on a SQL backend with proxied artifacts in `root`; `kill` and `start` again (same port,
    same database) to play a server that goes away and comes back."""

    def __init__(self, backend_uri: str, root: Path, port: int | None = None):
        self.backend_uri, self.root, self.port = backend_uri, root, port or _free_port()
        self.starts = 0
        self.start()

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = self.root / f"server-{self.starts}.log"
        # No job runner (huey worker processes): the registry does not use server-side jobs.
        env = {**os.environ, "MLFLOW_TRACKING_URI": "", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("mlflow")),
                "server",
                "--backend-store-uri",
                self.backend_uri,
                "--artifacts-destination",
                str(self.root / "mlartifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            cwd=self.root,
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill() takes its uvicorn workers too
            env=env,
        )
        ServerHandle.__init__(self, proc, f"http://127.0.0.1:{self.port}", log)

    def kill(self) -> None:
        """Gone at once, mid-request: no shutdown, no goodbye to the clients."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _cluster_root() -> Path:
    return Path(tempfile.mkdtemp(prefix="smitin-pg-", dir="/tmp"))


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL cluster for the session with an empty database `mlflow`."""
    root = _cluster_root()
    server = PostgresServer(root, _free_port())
    try:
        server.init()
        server.start()
        server.create_database("mlflow")
        yield server
    finally:
        try:
            server.stop("immediate")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass  # never started, or stopped by a test
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_mlflow_server(postgres, tmp_path_factory) -> MlflowServer:
    """The team's setup: an `mlflow server` whose backend store is the PostgreSQL database `mlflow`."""
    server = MlflowServer(postgres.url("mlflow"), tmp_path_factory.mktemp("pg-mlflow-server"))
    yield server
    server.stop()


@pytest.fixture
def start_mlflow_server(postgres, tmp_path):
    """Start a private `mlflow server` on the session's PostgreSQL (for a test that kills it); stopped after."""
    servers: list[MlflowServer] = []

    def start() -> MlflowServer:
        servers.append(MlflowServer(postgres.url("mlflow"), tmp_path / f"mlflow-server-{len(servers)}"))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def registry_on(uri: str, tmp: Path, prefix: str, lease_s: float = 1.0):
    """A Registry on `uri` whose model names start with `prefix` (tests share the database), with a short lock
    lease so a crashed lock holder costs a test about a second."""
    from registry.store import Registry

    s = _settings(tmp, uri)
    s.generator_name = f"{prefix}-smitin-generator"
    s.probe_set_prefix = f"{prefix}-smitin-probes-"
    s.coconet_name = f"{prefix}-smitin-coconet"
    s.lock_lease_s = lease_s
    return Registry(s)


@pytest.fixture
def pg_registry(tmp_path, pg_mlflow_server, monkeypatch, request):
    """A Registry on the PostgreSQL-backed `mlflow server`; model names get a per-test prefix."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return registry_on(pg_mlflow_server.uri, tmp_path, f"pg{abs(hash(request.node.nodeid)) % 10**8}")


def wait_for(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
