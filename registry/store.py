"""Where the registry lives and how to talk to it: settings (params.yaml `registry` + MLFLOW_TRACKING_URI), the
MLflow client, reachability checks, error translation, and the local registration lock.

Default: a SQLite file in the project (`sqlite:///mlflow.db`) with artifacts under `./mlartifacts`. Any
`MLFLOW_TRACKING_URI` (an `mlflow server` with a SQL backend, or another database URL) takes precedence.

Registrations and promotions of one model are serialised by `Registry.lock`: an fcntl file lock for a local
SQLite file, a `RegistryMutex` (a registered model used as a lock, see there) for a server or another database.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import socket
import threading
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
# Tag of a model version (and of its run) while its registration is under way: a version that still carries it was
# left by an interrupted registration (a crash, a server gone mid-way) and is neither served nor promoted.
PENDING = TAG + "pending"
# Registered models whose name starts with this are locks (RegistryMutex), not models: every listing skips them.
LOCK_PREFIX = "_smitin-lock-"


def is_lock_name(name: str) -> bool:
    return name.startswith(LOCK_PREFIX)


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # no "View run at" per registration
    # A dead server should fail within seconds, not after MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # one "Retrying ..." line per retried request would bury the one-line error a dead server ends in
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


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
    lock_timeout_s: float = Field(120.0, ge=0)  # wait this long for another registration / promotion to finish
    # a server's lock is given up by a holder that stopped renewing it for this long (crashed, killed, cut off)
    lock_lease_s: float = Field(30.0, gt=0)
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
    lock_lease_s: float = 30.0

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
            lock_lease_s=params.lock_lease_s,
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
        names = {m.name for m in self.registered_models()}
        if text in names:
            return text
        return f"{self.settings.probe_set_prefix}{text}"

    def registered_models(self, max_results: int = 1000) -> list:
        """Every registered model but the locks (`RegistryMutex`): what listings show."""
        return [m for m in self.client.search_registered_models(max_results=max_results) if not is_lock_name(m.name)]

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
    def lock(self, what: str = "registration", model: str | None = None):
        """Hold the registry lock while registering or promoting `model`, so that read-decide-write sequences
        (champion -> gates -> alias -> history event) of two processes never interleave. A local SQLite file: one
        fcntl lock for the whole file (SQLite allows a single writer anyway; two registrations racing would meet
        'database is locked' half-way). A server or another database: a `RegistryMutex` per model, which works
        across processes and machines (an `mlflow server` serialises single writes, not our sequences of them)."""
        path = self.lock_path()
        if path is None:
            with RegistryMutex(self, model or "registry", what):
                yield
            return
        with self._file_lock(path, what):
            yield

    @contextlib.contextmanager
    def _file_lock(self, path: Path, what: str):
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


LOCK_TAG = TAG + "lock."  # the lock model's tags: holder, token, beat, since


def _error_code(e: BaseException) -> str:
    return getattr(e, "error_code", "") or ""


class RegistryMutex:
    """A lock shared by every client of one registry (processes, machines), held as the registered model
    LOCK_PREFIX + model.

    Why a registered model: creating one is a test-and-set in every backend (the name is the table's primary
    key, so of two concurrent creates the database lets exactly one succeed and the other gets
    RESOURCE_ALREADY_EXISTS), it goes through the `mlflow server` like everything else (a team's clients talk to
    the server over HTTP and usually cannot reach its database, which rules out PostgreSQL advisory locks or
    SELECT ... FOR UPDATE), and it needs nothing outside MLflow. Its tags are written in the same transaction as
    the name: who holds it (`holder`), a random `token` per acquisition, and a heartbeat counter `beat`.

    A crashed holder must not block for ever: while held, a thread bumps `beat` every lease/4 s. A waiter that
    sees the same (token, beat) for a whole lease *on its own clock* (no clock comparison between machines)
    breaks the lock. Breaking is itself serialised by a marker model named after the stale token, and the lock is
    deleted only when it still carries that token, so two waiters never both break it, nor break a lock that a
    third one has since taken. Released by deleting the model (only if it still carries our token)."""

    def __init__(self, reg: Registry, model: str, what: str):
        self.reg, self.what = reg, what
        self.name = LOCK_PREFIX + model
        self.lease_s = reg.settings.lock_lease_s
        self.token = secrets.token_hex(8)
        self.lost = False  # set when the lock was broken under us (we stalled for over a lease)
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None
        self._seen: dict[tuple, float] = {}  # (what, token, beat) -> when first seen unchanged (monotonic)

    # ------------------------------------------------------------------ protocol
    def __enter__(self) -> RegistryMutex:
        self.acquire()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and (isinstance(exc, RegistryUnavailable) or is_unreachable(exc)):
            # the backend is gone: releasing would only wait for it again and hide why the command failed. The
            # lock is left to expire: the next command breaks it one lease after the server is back.
            self._stop.set()
            return
        self.release()

    def acquire(self) -> None:
        deadline = time.monotonic() + self.reg.settings.lock_timeout_s
        while not self._try_create(self.name, self._tags(beat=0)):
            held = self._read(self.name)
            if held is not None and self._stale(("lock", held.get("token"), held.get("beat"))):
                self._break(held)
                continue
            if time.monotonic() > deadline:
                who = (held or {}).get("holder") or "another process"
                raise RegistrationBusy(
                    f"another {who} has held the registry lock {self.name} on {self.reg.uri} for over "
                    f"{self.reg.settings.lock_timeout_s:g} s; try again when it has finished"
                )
            time.sleep(0.05 + secrets.randbelow(100) / 1000)  # jitter: two waiters do not retry in lockstep
        self._beater = threading.Thread(target=self._beat, name=f"lease {self.name}", daemon=True)
        self._beater.start()

    def release(self) -> None:
        self._stop.set()
        if self._beater is not None:
            self._beater.join()
        held = self._read(self.name)
        if held is None or held.get("token") != self.token:
            self.lost = True  # broken after we stalled: it is someone else's lock now, leave it alone
            logging.getLogger(__name__).warning(
                "the registry lock %s was taken over while this %s ran (it stalled for over %.0f s)",
                self.name,
                self.what,
                self.lease_s,
            )
            return
        self._delete(self.name)

    # ------------------------------------------------------------------ steps
    def _tags(self, beat: int) -> dict[str, str]:
        holder = f"{self.what} (pid {os.getpid()} on {socket.gethostname()})"
        return {
            LOCK_TAG + "holder": holder,
            LOCK_TAG + "token": self.token,
            LOCK_TAG + "beat": str(beat),
            LOCK_TAG + "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def _try_create(self, name: str, tags: dict[str, str]) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.reg.client.create_registered_model(
                name, tags=tags, description="smitin registry lock (not a model): removed when released"
            )
            return True
        except MlflowException as e:
            # RESOURCE_DOES_NOT_EXIST too: the store answers a duplicate create by reading the existing model, which
            # its holder may have deleted in between; either way the name was taken when we tried
            if _error_code(e) not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
            return False

    def _read(self, name: str) -> dict[str, str] | None:
        """The lock's tags without the prefix, None when it is gone."""
        from mlflow.exceptions import MlflowException

        try:
            tags = self.reg.client.get_registered_model(name).tags
        except MlflowException as e:
            if _error_code(e) in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                return None
            raise
        return {k.removeprefix(LOCK_TAG): v for k, v in tags.items() if k.startswith(LOCK_TAG)}

    def _delete(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.reg.client.delete_registered_model(name)
        except MlflowException as e:
            if _error_code(e) not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise

    def _stale(self, key: tuple) -> bool:
        """True once `key` (a holder's token and beat) has been seen unchanged for a whole lease."""
        now = time.monotonic()
        first = self._seen.setdefault(key, now)
        return now - first > self.lease_s

    def _break(self, held: dict[str, str]) -> None:
        """Remove a lock whose holder stopped renewing it, unless another waiter is doing so already."""
        token = held.get("token", "")
        marker = f"{self.name}-break-{token}"
        if not self._try_create(marker, self._tags(beat=0)):
            # another waiter is breaking it; a marker left by one that died is removed after a lease too
            mark = self._read(marker)
            if mark is not None and self._stale(("marker", mark.get("token"), token)):
                self._delete(marker)
            return
        try:
            now = self._read(self.name)
            if now is not None and (now.get("token"), now.get("beat")) == (token, held.get("beat")):
                logging.getLogger(__name__).warning(
                    "breaking the registry lock %s: its holder (%s) stopped renewing it %.0f s ago",
                    self.name,
                    held.get("holder", "?"),
                    self.lease_s,
                )
                self._delete(self.name)
        finally:
            self._delete(marker)

    def _beat(self) -> None:
        """Renew the lease until released; stop when the lock is gone (broken after a stall)."""
        from mlflow.exceptions import MlflowException

        beat = 0
        while not self._stop.wait(self.lease_s / 4):
            beat += 1
            try:
                self.reg.client.set_registered_model_tag(self.name, LOCK_TAG + "beat", str(beat))
            except MlflowException as e:
                if _error_code(e) in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                    return
            except Exception:  # noqa: BLE001 - server briefly unreachable: try again at the next beat
                pass


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


_UNREACHABLE = (
    "connection refused",
    "max retries exceeded",
    "failed to establish",
    "name or service not known",
    "connectionerror",
    "remote end closed",
    "could not connect to server",  # psycopg2: a postgresql:// registry whose database is down
    "server closed the connection unexpectedly",
    "connection to server at",
)


def is_unreachable(e: BaseException) -> bool:
    """The registry's server or database cannot be reached (not: it refused what we asked)."""
    low = str(e).lower()
    return any(s in low for s in _UNREACHABLE)


def unreachable_reason(e: BaseException) -> str:
    """A few words for the user instead of urllib3's paragraph."""
    low = str(e).lower()
    if "connection refused" in low:
        return "connection refused"
    if any(s in low for s in ("remote end closed", "connection reset", "connection aborted", "closed the connection")):
        return "connection lost"
    if "name or service not known" in low:
        return "unknown host"
    return first_line(e)[:160]


@contextlib.contextmanager
def translate_errors(reg: Registry):
    """Turn backend failures into one-line `RegistryError`s; leave our own errors alone."""
    try:
        yield
    except RegistryError:
        raise
    except Exception as e:  # noqa: BLE001 - classified below, re-raised when unknown
        from mlflow.exceptions import MlflowException

        low = str(e).lower()
        if "database is locked" in low:
            raise RegistrationBusy(f"the registry database {reg.uri} is locked by another process; try again") from None
        failing = re.search(r"too many (\d+) error responses", low)
        if failing:  # the server is up and answers, but fails every retry: what is behind it (its database) is not
            raise RegistryUnavailable(
                f"MLflow tracking server {reg.uri} answers HTTP {failing[1]} to every retry: is its database up? "
                f"(see the server's log)"
            ) from None
        if is_unreachable(e):
            what = "MLflow tracking server" if reg.is_server else "registry database"
            raise RegistryUnavailable(f"{what} {reg.uri} is unreachable ({unreachable_reason(e)})") from None
        if isinstance(e, MlflowException):
            code = getattr(e, "error_code", "")
            if code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise ModelNotFound(first_line(e)) from None
            raise RegistryError(f"MLflow: {first_line(e)}") from None
        raise
