"""Registry test fixtures: small generator / probe-set directories in the on-disk layouts of `models` (no torch),
a migrated MLflow SQLite database built once per test session and copied per test, and a real `mlflow server`
on a free loopback port (started once, stopped at the end). Import the fixtures into a test module (or a
conftest) with `from tests.conftest_registry import *`.

Session resources are cached at module level, so modules that both import these fixtures share one database
template and one server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_SESSION: dict = {}


# ------------------------------------------------------------------------------------------- artifact dirs
def make_generator_dir(path: Path, seed: int = 0, metrics: dict | None = None) -> str:
    """A generator directory as `models.generator.save_generator` writes it; returns its fingerprint."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file(
        {"blocks.0.attn.qkv.weight": rng.standard_normal((24, 8)).astype(np.float32)},
        str(path / "generator.safetensors"),
    )
    save_file({"codebooks": rng.standard_normal((2, 4, 3)).astype(np.float32)}, str(path / "codec.safetensors"))
    (path / "codec.json").write_text(json.dumps({"kind": "rvq-mel", "n_codebooks": 2, "card": 4}))
    fp = f"{seed:04d}" + "ab" * 14
    meta = {
        "config": {"n_layers": 2, "n_heads": 2, "dim": 8, "n_codebooks": 2, "card": 4},
        "fingerprint": fp,
        "codec": {"kind": "rvq-mel", "fingerprint": "c0dec"},
    }
    if metrics:
        meta["metrics"] = metrics
    (path / "generator.json").write_text(json.dumps(meta, indent=2))
    return fp


def make_probe_set_dir(
    path: Path, trait: str, generator_fingerprint: str, best_acc: float = 0.9, seed: int = 0
) -> Path:
    """A probe-set directory as `models.probes.ProbeSet.save` writes it, with the given accuracy level."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    L, H, D = 2, 2, 4
    rng = np.random.default_rng(seed)
    acc = np.clip(best_acc - rng.uniform(0, 0.1, (L, H)), 0, 1).astype(np.float32)
    acc.flat[0] = best_acc
    arrays = {n: rng.standard_normal((L, H, D)).astype(np.float32) for n in ("coef", "direction", "random_direction")}
    arrays.update(
        {n: rng.uniform(0.5, 1, (L, H)).astype(np.float32) for n in ("intercept", "sigma", "weight", "random_sigma")}
    )
    arrays["accuracy"] = acc
    save_file(arrays, str(path / "probes.safetensors"))
    flat = np.sort(acc.reshape(-1))[::-1]
    meta = {
        "trait": trait,
        "generator_fingerprint": generator_fingerprint,
        "data_hash": f"data{seed}",
        "params": {"position": "last", "C": 1.0, "direction": "mass_mean"},
        "n_layers": L,
        "n_heads": H,
        "head_dim": D,
        "metrics": {
            "best_acc": float(flat[0]),
            "mean_acc": float(flat.mean()),
            "top16_acc": float(flat[:16].mean()),
            "n_train": 10,
        },
        "created_at": "2026-11-22T00:00:00Z",
        "format": "smitin-probe-set/1",
    }
    (path / "probe_set.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path


# ------------------------------------------------------------------------------------------- MLflow backends
def _template_db(factory) -> Path:
    if "template" not in _SESSION:
        import logging

        from mlflow import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        d = factory.mktemp("mlflow-template")
        db = d / "mlflow.db"
        MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()  # runs the migrations once
        _SESSION["template"] = db
    return _SESSION["template"]


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory) -> Path:
    """A freshly migrated MLflow SQLite database, built once per session: copy it, never write to it."""
    return _template_db(tmp_path_factory)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerHandle:
    def __init__(self, proc: subprocess.Popen, uri: str, log: Path):
        self.proc, self._uri, self.log = proc, uri, log
        self._ready = False

    @property
    def uri(self) -> str:
        """Waits for /health the first time (the server boots in the background meanwhile)."""
        if not self._ready:
            import requests

            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
                try:
                    if requests.get(self._uri + "/health", timeout=2).status_code == 200:
                        self._ready = True
                        break
                except requests.RequestException:
                    pass
                time.sleep(0.25)
            else:
                raise RuntimeError(f"mlflow server did not start: {self.log.read_text()[-2000:]}")
        return self._uri

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server's own process group (its uvicorn workers)
            try:
                self.proc.wait(1)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> ServerHandle:
    """A real `mlflow server` (SQL backend, proxied artifacts) on a free loopback port. Starting it does not
    wait; `.uri` does. It migrates its own fresh database while the test process builds the SQLite template
    (two files, so no 'database is locked' race)."""
    if "server" not in _SESSION:
        d = tmp_path_factory.mktemp("mlflow-server")
        port = _free_port()
        log = d / "server.log"
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        # No job runner (huey worker processes): the registry does not use server-side jobs.
        env = {**os.environ, "MLFLOW_TRACKING_URI": "", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        proc = subprocess.Popen(
            [
                str(mlflow_bin),
                "server",
                "--backend-store-uri",
                f"sqlite:///{d / 'mlflow.db'}",
                "--artifacts-destination",
                str(d / "mlartifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            cwd=d,
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        _SESSION["server"] = ServerHandle(proc, f"http://127.0.0.1:{port}", log)
    handle = _SESSION["server"]
    yield handle
    handle.stop()


def _settings(tmp: Path, uri: str):
    from registry.store import Settings

    s = Settings.load(None, tracking_uri=uri)
    s.artifact_root = str(tmp / "mlartifacts")
    s.cache_dir = tmp / "cache"
    s.lock_timeout_s = 60
    return s


@pytest.fixture
def sqlite_registry(tmp_path, mlflow_template_db, monkeypatch):
    """A Registry on a private copy of the migrated SQLite template (the project's default backend)."""
    from registry.store import Registry

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_template_db, db)
    return Registry(_settings(tmp_path, f"sqlite:///{db}"))


@pytest.fixture
def server_registry(tmp_path, mlflow_server, monkeypatch, request):
    """A Registry on the shared `mlflow server`; model names get a per-test prefix so tests do not interfere."""
    from registry.store import Registry

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    s = _settings(tmp_path, mlflow_server.uri)
    tag = f"t{abs(hash(request.node.nodeid)) % 10**8}"
    s.generator_name = f"{tag}-smitin-generator"
    s.probe_set_prefix = f"{tag}-smitin-probes-"
    s.coconet_name = f"{tag}-smitin-coconet"
    return Registry(s)


@pytest.fixture(params=["sqlite", "server", "pg"])
def any_registry(request):
    """Each test that uses it runs against the SQLite default, a real `mlflow server` on SQLite, and the shared
    registry a team runs: an `mlflow server` on PostgreSQL (tests/conftest_postgres.py)."""
    return request.getfixturevalue(f"{request.param}_registry")
