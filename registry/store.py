"""Where the registry lives and how to talk to it: settings (params.yaml `registry` + MLFLOW_TRACKING_URI), the
MLflow client, reachability checks, error translation, and the local registration lock.

Default: a SQLite file in the project (`sqlite:///mlflow.db`) with artifacts under `./mlartifacts`. Any
`MLFLOW_TRACKING_URI` (an `mlflow server` with a SQL backend, or another database URL) takes precedence.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from urllib.parse import urlparse

from registry.errors import ModelNotFound, RegistrationBusy, RegistryError, RegistryUnavailable

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
CHAMPION, CHALLENGER = "champion", "challenger"
TAG = "smitin."  # prefix of every tag this package writes
# Probe sets trained on Hugging Face MusicGen are registered as PREFIX + "musicgen-" + trait (smitin-probes-musicgen-
# drums), so they have their own champion and never compete with the builtin generator's probe sets.
MUSICGEN_INFIX = "musicgen-"

# The numbers and names `registry` reads from params.yaml; the section there overrides any of them.
DEFAULTS: dict = {
    "tracking_uri": DEFAULT_TRACKING_URI,
    "artifact_root": "mlartifacts",
    "experiment": "smitin",
    "generator_name": "smitin-generator",
    "probe_set_prefix": "smitin-probes-",
    "coconet_name": "smitin-coconet",
    "cache_dir": None,  # default: $SMITIN_CACHE_DIR or ~/.cache/smitin/registry
    "lock_timeout_s": 120,
    "gates": {
        "tolerance": 0.01,
        "generator": {},
        "probe_set": {"best_acc": "higher", "top16_acc": "higher", "mean_acc": "higher"},
        "coconet": {"nll.frame.nll": {"better": "lower", "tolerance": 0.02}},
    },
}


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # no "View run at" per registration
    # A dead server should fail within seconds, not after MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in (over or {}).items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def read_settings_section(params_path: str | os.PathLike | None = "params.yaml") -> dict:
    """The `registry` section of params.yaml merged over the defaults (a missing file or section is fine)."""
    section: dict = {}
    if params_path and Path(params_path).exists():
        import yaml

        with open(params_path) as f:
            section = (yaml.safe_load(f) or {}).get("registry") or {}
    return _merge(DEFAULTS, section)


@dataclass
class Settings:
    tracking_uri: str = DEFAULT_TRACKING_URI
    artifact_root: str | None = "mlartifacts"
    experiment: str = "smitin"
    generator_name: str = "smitin-generator"
    probe_set_prefix: str = "smitin-probes-"
    coconet_name: str = "smitin-coconet"
    cache_dir: Path = field(
        default_factory=lambda: Path(
            os.environ.get(
                "SMITIN_CACHE_DIR",
                Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "smitin" / "registry",
            )
        )
    )
    lock_timeout_s: float = 120.0
    gates: dict = field(default_factory=lambda: _merge(DEFAULTS["gates"], {}))
    section: dict = field(default_factory=dict)  # the whole merged params section (stage inputs live there too)

    @classmethod
    def load(cls, params_path: str | os.PathLike | None = "params.yaml", tracking_uri: str | None = None) -> Settings:
        s = read_settings_section(params_path)
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or s["tracking_uri"]
        kwargs = dict(
            tracking_uri=uri,
            artifact_root=s["artifact_root"],
            experiment=s["experiment"],
            generator_name=s["generator_name"],
            probe_set_prefix=s["probe_set_prefix"],
            coconet_name=s["coconet_name"],
            lock_timeout_s=float(s["lock_timeout_s"]),
            gates=s["gates"],
            section=s,
        )
        if s.get("cache_dir"):
            kwargs["cache_dir"] = Path(s["cache_dir"])
        return cls(**kwargs)


class Registry:
    """One tracking/registry backend. Cheap to create; the MLflow client is made (and the backend checked) on
    first use."""

    def __init__(self, settings: Settings | None = None, **overrides):
        settings = settings or Settings.load(None)
        for k, v in overrides.items():
            setattr(settings, k, v)
        self.settings = settings
        self.uri = settings.tracking_uri
        _quiet_mlflow()

    # ------------------------------------------------------------------ backend
    @property
    def scheme(self) -> str:
        return urlparse(self.uri).scheme

    @property
    def is_server(self) -> bool:
        return self.scheme in ("http", "https")

    @property
    def sqlite_path(self) -> Path | None:
        if self.scheme != "sqlite":
            return None
        # sqlite:///rel.db -> rel.db (relative to the working directory), sqlite:////abs.db -> /abs.db
        return Path(self.uri[len("sqlite:///") :])

    def describe(self) -> str:
        return self.uri

    def check(self, create: bool = False) -> None:
        """Fail with one line when the backend cannot be used: server down, database missing (unless `create`)."""
        if self.is_server:
            import requests

            try:
                r = requests.get(self.uri.rstrip("/") + "/health", timeout=5)
            except requests.RequestException as e:
                reason = type(e).__name__
                if "Connection refused" in str(e) or "NewConnectionError" in str(e):
                    reason = "connection refused"
                raise RegistryUnavailable(
                    f"MLflow tracking server {self.uri} is unreachable ({reason}); start it with `mlflow server "
                    f"--backend-store-uri sqlite:///mlflow.db --artifacts-destination ./mlartifacts` or point "
                    f"MLFLOW_TRACKING_URI at a running one"
                ) from None
            if r.status_code != 200:
                raise RegistryUnavailable(f"MLflow tracking server {self.uri} is not healthy (HTTP {r.status_code})")
            return
        if self.scheme == "":
            raise RegistryError(
                f"tracking URI {self.uri!r} is not a database or server URI: the registry needs "
                f"e.g. sqlite:///mlflow.db or http://host:5000 (plain ./mlruns folders cannot hold "
                f"a model registry)"
            )
        if self.scheme == "file":
            raise RegistryError(
                f"tracking URI {self.uri} is a file store; the registry needs a database backend "
                f"(sqlite:///mlflow.db) or an `mlflow server`"
            )
        db = self.sqlite_path
        if db is not None and not create and not db.exists():
            raise ModelNotFound(
                f"no MLflow registry at {self.uri} ({db} does not exist): register something "
                f"first (`smitin registry register`) or set MLFLOW_TRACKING_URI"
            )
        if db is not None and not db.parent.exists():
            raise RegistryError(f"cannot create the registry database {db}: folder {db.parent} does not exist")
        if db is not None and db.exists():
            check_sqlite_registry(db)

    @cached_property
    def client(self):
        from mlflow import MlflowClient

        _quiet_mlflow()  # again: importing mlflow configures its loggers
        with translate_errors(self):
            return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def artifact_location(self) -> str | None:
        """Where a new experiment keeps artifacts: a local folder next to a local database, the server's choice
        (proxied `mlflow-artifacts:`) for a tracking server."""
        if self.is_server or not self.settings.artifact_root:
            return None
        root = Path(self.settings.artifact_root)
        if not root.is_absolute() and self.sqlite_path is not None and self.sqlite_path.is_absolute():
            root = self.sqlite_path.parent / root
        return root.resolve().as_uri()

    def experiment_id(self) -> str:
        c = self.client
        exp = c.get_experiment_by_name(self.settings.experiment)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                c.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        from mlflow.exceptions import MlflowException

        try:
            return c.create_experiment(
                self.settings.experiment, artifact_location=self.artifact_location(), tags={TAG + "project": "smitin"}
            )
        except MlflowException:  # created by a concurrent process in between
            exp = c.get_experiment_by_name(self.settings.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    # ------------------------------------------------------------------ names
    def model_name(self, kind: str, trait: str | None = None, backend: str = "builtin") -> str:
        """The registered name: the generator's, or PREFIX + trait for a probe set (PREFIX + "musicgen-" + trait for
        one trained on MusicGen)."""
        if kind == "generator":
            return self.settings.generator_name
        if kind == "coconet":
            return self.settings.coconet_name
        if not trait:
            raise RegistryError("a probe set needs a trait name")
        return f"{self.settings.probe_set_prefix}{MUSICGEN_INFIX if backend == 'musicgen' else ''}{trait}"

    def probe_set_backend(self, name: str) -> str:
        """'musicgen' for a MusicGen probe-set name, else 'builtin'."""
        return "musicgen" if name.startswith(self.settings.probe_set_prefix + MUSICGEN_INFIX) else "builtin"

    def resolve_name(self, text: str) -> str:
        """A registered model name from what a user typed: the full name, `generator`, or a trait (`drums`)."""
        if text.startswith("models:/"):
            text = text[len("models:/") :].split("@")[0].split("/")[0]
        if text == "generator":
            return self.settings.generator_name
        if text == "coconet":
            return self.settings.coconet_name
        if text.startswith(self.settings.probe_set_prefix) or text in (
            self.settings.generator_name,
            self.settings.coconet_name,
        ):
            return text
        names = {m.name for m in self.client.search_registered_models(max_results=1000)}
        if text in names:
            return text
        return f"{self.settings.probe_set_prefix}{text}"

    # ------------------------------------------------------------------ concurrency
    def lock_path(self) -> Path | None:
        """The lock file of a local SQLite registry: inside its artifact folder (git-ignored, next to what it
        guards), else next to the database file. None for a server."""
        db = self.sqlite_path
        if db is None:
            return None
        location = self.artifact_location()
        if location and location.startswith("file:"):
            from urllib.parse import urlparse
            from urllib.request import url2pathname

            return Path(url2pathname(urlparse(location).path)) / ".smitin-registry.lock"
        return db.with_name(db.name + ".smitin.lock")

    @contextlib.contextmanager
    def lock(self, what: str = "registration"):
        """Serialise registrations/promotions on one local database (SQLite allows a single writer; two
        registrations racing would otherwise meet 'database is locked' half-way). A tracking server serialises
        writes itself, so there the lock is a no-op."""
        path = self.lock_path()
        if path is None:
            yield
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.settings.lock_timeout_s
        with open(path, "a+") as f:
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        f.seek(0)
                        holder = f.read().strip() or "another process"
                        raise RegistrationBusy(
                            f"another {holder} has held the registry lock {path} for over "
                            f"{self.settings.lock_timeout_s:.0f} s; try again when it has finished"
                        ) from None
                    time.sleep(0.1)
            try:
                f.seek(0)
                f.truncate()
                f.write(f"{what} (pid {os.getpid()})")
                f.flush()
                yield
            finally:
                f.seek(0)
                f.truncate()
                fcntl.flock(f, fcntl.LOCK_UN)


def check_sqlite_registry(db: Path) -> None:
    """Refuse, with one line, a registry file that is not an intact MLflow database: empty (MLflow would silently
    create a new, empty registry in it), truncated or overwritten (SQLAlchemy would fail deep inside a command with
    a long traceback). Never modifies the file."""
    import sqlite3

    if db.stat().st_size == 0:
        raise RegistryError(
            f"the registry database {db} is empty (0 bytes): restore it from a backup, or remove it "
            f"to start a new registry"
        )
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            ok = con.execute("PRAGMA quick_check").fetchone()[0]
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise RegistryError(f"the registry database {db} is damaged ({e}): restore it from a backup") from None
    if ok != "ok":
        raise RegistryError(
            f"the registry database {db} is damaged (integrity check: {str(ok)[:120]}): restore it from a backup"
        )
    if "alembic_version" not in tables or "registered_models" not in tables:
        raise RegistryError(f"{db} is an SQLite file but not an MLflow registry (no registered_models table)")


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def translate_errors(reg: Registry):
    """Turn backend failures into one-line `RegistryError`s; leave our own errors alone."""
    try:
        yield
    except RegistryError:
        raise
    except Exception as e:  # noqa: BLE001 - classified below, re-raised when unknown
        from mlflow.exceptions import MlflowException

        text = str(e)
        low = text.lower()
        if "database is locked" in low:
            raise RegistrationBusy(f"the registry database {reg.uri} is locked by another process; try again") from None
        if any(
            s in low
            for s in (
                "connection refused",
                "max retries exceeded",
                "failed to establish",
                "name or service not known",
                "connectionerror",
                "remote end closed",
            )
        ):
            raise RegistryUnavailable(
                f"MLflow tracking server {reg.uri} is unreachable ({first_line(e)[:160]})"
            ) from None
        if isinstance(e, MlflowException):
            code = getattr(e, "error_code", "")
            if code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise ModelNotFound(first_line(e)) from None
            raise RegistryError(f"MLflow: {first_line(e)}") from None
        raise
