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
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlparse

from pydantic import BeforeValidator, ConfigDict, Field

from core.config import Section, load_section
from registry.errors import ModelNotFound, RegistrationBusy, RegistryError, RegistryUnavailable

CHAMPION, CHALLENGER = "champion", "challenger"
TAG = "smitin."  # prefix of every tag this package writes
# Probe sets trained on Hugging Face MusicGen are registered as PREFIX + "musicgen-" + trait (smitin-probes-musicgen-
# drums), so they have their own champion and never compete with the builtin generator's probe sets.
MUSICGEN_INFIX = "musicgen-"


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # no "View run at" per registration
    # A dead server should fail within seconds, not after MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


Rule = Literal["higher", "lower"]


class MetricGate(Section):
    """One gated metric: which way is better, and its own slack."""

    better: Rule = "higher"
    tolerance: float | None = Field(None, ge=0)  # null: the gates' tolerance


# a metric's rule: "higher" | "lower", or {better: ..., tolerance: ...}
GateRule = Annotated[MetricGate, BeforeValidator(lambda v: {"better": v} if isinstance(v, str) else v)]


class GatesParams(Section):
    """params.yaml `registry.gates`: per kind of model, metric -> rule; a candidate may not be worse than the
    champion on any of them beyond the tolerance."""

    tolerance: float = Field(0.01, ge=0)  # absolute slack on each gated metric
    generator: dict[str, GateRule] = Field(
        default_factory=lambda: {"valid_loss": MetricGate(better="lower", tolerance=0.05)}
    )
    probe_set: dict[str, GateRule] = Field(
        default_factory=lambda: {
            name: MetricGate(better="higher")
            for name in (
                "best_acc",
                "top16_acc",
                "mean_acc",
                "steering.continuation.add.smitin.success",
                "steering.text.add.smitin.success",
            )
        }
    )
    coconet: dict[str, GateRule] = Field(
        default_factory=lambda: {"nll.frame.nll": MetricGate(better="lower", tolerance=0.02)}
    )

    def rules(self, kind: str) -> list[tuple[str, str, float]]:
        """(metric, better, slack) of each metric gated for `kind` (generator | probe_set | coconet)."""
        spec: dict[str, MetricGate] = getattr(self, kind, None) or {}
        return [
            (metric, g.better, self.tolerance if g.tolerance is None else g.tolerance) for metric, g in spec.items()
        ]


class RegisterParams(Section):
    """params.yaml `registry.register`: what the DVC stage `register` logs ({trait} is replaced per trait). An
    entry left out is not registered."""

    traits: list[str] | None = None  # null: the traits of probes.traits
    generator: str | None = None  # the generator's folder
    generator_metrics: str | None = None
    generator_plots: list[str] = Field(default_factory=list)
    probe_sets: str | None = None  # each trait's probe-set folder
    steering_metrics: str | None = None  # the trait's subtree is logged as steering.* ({trait} in the name: all of it)
    plots: list[str] = Field(default_factory=list)  # each trait's plots (glob patterns)
    coconet: str | None = None  # the Coconet model's folder
    coconet_metrics: str | None = None
    coconet_plots: list[str] = Field(default_factory=list)


class RegistryParams(Section):
    """params.yaml `registry`."""

    model_config = ConfigDict(populate_by_name=True)  # `register` is read as register_ (BaseModel has a register)
    tracking_uri: str = Field("sqlite:///mlflow.db", min_length=1)  # MLFLOW_TRACKING_URI overrides it
    artifact_root: str | None = "mlartifacts"  # local artifact folder for a local database (a server keeps its own)
    experiment: str = Field("smitin", min_length=1)
    generator_name: str = Field("smitin-generator", min_length=1)
    probe_set_prefix: str = Field("smitin-probes-", min_length=1)  # + trait: smitin-probes-drums
    coconet_name: str = Field("smitin-coconet", min_length=1)
    cache_dir: str | None = None  # downloaded versions (null: $SMITIN_CACHE_DIR or ~/.cache/smitin/registry)
    lock_timeout_s: float = Field(120.0, ge=0)  # wait this long for another registration on the same SQLite file
    register_: RegisterParams = Field(default_factory=RegisterParams, alias="register")
    gates: GatesParams = Field(default_factory=GatesParams)


def default_cache_dir() -> Path:
    return Path(
        os.environ.get(
            "SMITIN_CACHE_DIR", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "smitin" / "registry"
        )
    )


@dataclass
class Settings:
    """The registry in use: params.yaml `registry` with the tracking URI and cache folder resolved (tests and
    commands may change these attributes)."""

    tracking_uri: str
    artifact_root: str | None
    experiment: str
    generator_name: str
    probe_set_prefix: str
    coconet_name: str
    cache_dir: Path
    lock_timeout_s: float
    gates: GatesParams
    register: RegisterParams

    @classmethod
    def from_params(cls, params: RegistryParams, tracking_uri: str | None = None) -> Settings:
        """`tracking_uri`, else $MLFLOW_TRACKING_URI, else params; the cache: params, else the default folder."""
        return cls(
            tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or params.tracking_uri,
            artifact_root=params.artifact_root,
            experiment=params.experiment,
            generator_name=params.generator_name,
            probe_set_prefix=params.probe_set_prefix,
            coconet_name=params.coconet_name,
            cache_dir=Path(params.cache_dir) if params.cache_dir else default_cache_dir(),
            lock_timeout_s=params.lock_timeout_s,
            gates=params.gates,
            register=params.register_,
        )

    @classmethod
    def load(cls, params_path: str | os.PathLike | None = "params.yaml", tracking_uri: str | None = None) -> Settings:
        """From the `registry` section of `params_path` (no file or no section: the defaults)."""
        return cls.from_params(read_registry_params(params_path), tracking_uri)


def read_registry_params(params_path: str | os.PathLike | None = "params.yaml") -> RegistryParams:
    if params_path and Path(params_path).exists():
        return load_section(RegistryParams, params_path, "registry")
    return RegistryParams()


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
