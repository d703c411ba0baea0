"""The shared registry a team runs: an `mlflow server` on PostgreSQL (Debian's, started by the fixtures of
tests/conftest_postgres.py). The CLI and the loading used by `smitin generate` against it, the registry lock
(concurrent promotions from two processes, a crashed lock holder, a busy lock), and a server that goes away in the
middle of a registration."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from registry.errors import RegistrationBusy, RegistryError
from registry.history import read_history
from registry.loading import check_compatible, fetch
from registry.promotion import promote
from registry.registration import register_dir
from registry.store import LOCK_PREFIX, PENDING
from tests.conftest_postgres import registry_on, wait_for
from tests.conftest_registry import ROOT, make_generator_dir, make_probe_set_dir

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _env(tmp_path: Path) -> dict:
    env = {**os.environ, "SMITIN_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _locks(reg, name: str) -> list[str]:
    """The lock models of `name` in the registry: its lock and any break marker."""
    found = reg.client.search_registered_models(max_results=1000)
    return sorted(m.name for m in found if m.name.startswith(LOCK_PREFIX + name))


def _params(reg, tmp_path: Path, extra: str = "") -> str:
    """A params.yaml naming `reg`'s models, for the CLI."""
    path = tmp_path / "params.yaml"
    path.write_text(
        "registry:\n"
        f"  generator_name: {reg.settings.generator_name}\n"
        f"  probe_set_prefix: {reg.settings.probe_set_prefix}\n"
        f"  coconet_name: {reg.settings.coconet_name}\n" + extra
    )
    return str(path)


def _promotions(reg, name: str) -> list[dict]:
    return [e for e in read_history(reg.client, name) if e.get("action") in ("promote", "force-promote")]


def _champion(reg, name: str) -> str:
    return str(reg.client.get_model_version_by_alias(name, "champion").version)


# ------------------------------------------------------------------------------------------------ the cycle
def test_cli_cycle_on_postgres_backed_server(pg_registry, postgres, tmp_path, capsys, monkeypatch):
    """register -> promote -> refused promotion -> list -> history -> fetch, through the CLI, and the loading
    `smitin generate` uses; every record lands in PostgreSQL."""
    from generation.cli import main

    reg = pg_registry
    monkeypatch.setenv("SMITIN_CACHE_DIR", str(tmp_path / "cache"))
    gen, drums = reg.settings.generator_name, reg.model_name("probe_set", "drums")
    fp = make_generator_dir(tmp_path / "generator", seed=1, metrics={"val_loss": 3.9})
    good = make_probe_set_dir(tmp_path / "good", "drums", fp, best_acc=0.85, seed=1)
    worse = make_probe_set_dir(tmp_path / "worse", "drums", fp, best_acc=0.70, seed=2)
    base = ["registry", "--tracking-uri", reg.uri, "--params", _params(reg, tmp_path)]

    assert main(base + ["register", "--generator", str(tmp_path / "generator"), "--probes", str(good)]) == 0
    assert main(base + ["promote", "generator"]) == 0 and main(base + ["promote", "drums"]) == 0
    assert main(base + ["register", "--probes", f"drums={worse}"]) == 0
    capsys.readouterr()
    assert main(base + ["promote", "drums"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"smitin: error: {drums} v2 not promoted: gate metrics failed")

    assert main(base + ["list"]) == 0
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.startswith(drums + " "))
    assert row[:6] == [drums, "2", "v2", "v1", "v2", "best_acc=0.850"], out
    assert LOCK_PREFIX not in out  # the locks taken by the commands above are gone, and never listed
    assert main(base + ["history", "drums"]) == 0
    out = capsys.readouterr().out
    assert "promote   champion    -     v1" in out and "refused   champion    v1    v2" in out
    assert main(base + ["fetch", f"models:/{drums}@champion"]) == 0
    assert f"{drums} v1 (probe_set) -> " in capsys.readouterr().out

    # the loading `smitin generate` does: champion generator + champion probe set, verified and compatible
    probes, generator = fetch(reg, f"models:/{drums}@champion"), fetch(reg, f"models:/{gen}@champion")
    assert (probes.path / "probes.safetensors").read_bytes() == (good / "probes.safetensors").read_bytes()
    check_compatible(probes, generator)
    assert generator.fingerprint == fp and probes.cached  # the CLI's fetch above filled the cache

    # the records are PostgreSQL's, not a file's
    rows = postgres.query("mlflow", f"SELECT name, alias, version FROM registered_model_aliases WHERE name = '{drums}'")
    assert sorted(rows) == [(drums, "challenger", 2), (drums, "champion", 1)]
    assert not _locks(reg, gen) and not _locks(reg, drums)


def test_clients_writing_to_postgresql_directly(postgres, tmp_path, monkeypatch):
    """A `postgresql://` tracking URI (no server; artifacts in a local folder): register, promote, load, and two
    promotions at once from two threads with their own clients, serialised by the same lock. Its own database:
    experiments a server created keep their artifacts behind that server (mlflow-artifacts:), out of reach here."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    reg = registry_on(postgres.create_database("direct"), tmp_path, "direct")
    fp = make_generator_dir(tmp_path / "g", seed=1)
    gen = register_dir(reg, tmp_path / "g")
    assert promote(reg, "generator").promoted
    probes = [register_dir(reg, make_probe_set_dir(tmp_path / f"p{i}", "drums", fp, seed=i)) for i in range(3)]
    name = probes[0].name
    promote(reg, name, "1")
    clients = [registry_on(reg.uri, tmp_path, "direct") for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        # forced: the race, not the gates, is under test (either may come second and be compared with the other)
        done = list(pool.map(lambda rv: promote(rv[0], name, rv[1], force=True), zip(clients, ["2", "3"])))
    assert all(d.promoted for d in done)
    events = [(e["from"], e["to"]) for e in _promotions(reg, name)]
    assert events in ([(None, "1"), ("1", "2"), ("2", "3")], [(None, "1"), ("1", "3"), ("3", "2")])
    assert _champion(reg, name) == events[-1][1]
    local = fetch(reg, f"models:/{name}@champion")
    check_compatible(local, fetch(reg, f"models:/{gen.name}@champion"))
    assert local.version == events[-1][1] and not _locks(reg, name)


# ------------------------------------------------------------------------------------------------ the lock
def test_lock_is_exclusive_renewed_hidden_and_one_line_when_busy(pg_registry, tmp_path, capsys, monkeypatch):
    """A promotion that holds the lock for several leases keeps it (it renews it); a second promotion waits for it
    and then sees its result; a waiter that gives up says who holds it, in one line; `list` never shows the lock."""
    from generation.cli import main
    from registry import promotion

    reg = pg_registry
    reg.settings.lock_lease_s = 0.4
    make_generator_dir(tmp_path / "g1", seed=1)
    make_generator_dir(tmp_path / "g2", seed=2)
    v1, v2 = register_dir(reg, tmp_path / "g1"), register_dir(reg, tmp_path / "g2")
    name = v1.name
    held, released = threading.Event(), []
    gates = promotion.evaluate_gates

    def slow_gates(*args, **kwargs):  # the holder's promotion takes several leases to decide
        if threading.current_thread().name == "holder":
            held.set()
            time.sleep(1.5)
        return gates(*args, **kwargs)

    def hold():
        promote(reg, name, v1.version, reason="holder")
        released.append(time.monotonic())

    monkeypatch.setattr(promotion, "evaluate_gates", slow_gates)
    holder = threading.Thread(target=hold, name="holder")
    holder.start()
    assert held.wait(30)
    try:
        assert _locks(reg, name) == [LOCK_PREFIX + name]
        capsys.readouterr()
        assert main(["registry", "--tracking-uri", reg.uri, "--params", str(tmp_path / "none.yaml"), "list"]) == 0
        assert LOCK_PREFIX not in capsys.readouterr().out

        impatient = registry_on(reg.uri, tmp_path, "unused", lease_s=0.4)
        impatient.settings.generator_name, impatient.settings.lock_timeout_s = name, 0.3
        with pytest.raises(RegistrationBusy) as busy:
            promote(impatient, name, v2.version)
        msg = str(busy.value)
        assert "\n" not in msg and msg.startswith(f"another promotion of {name} (pid {os.getpid()} on "), msg

        patient = registry_on(reg.uri, tmp_path, "unused", lease_s=0.4)
        patient.settings.generator_name = name
        done = promote(patient, name, v2.version, reason="waiter")
    finally:
        holder.join(30)
    # the waiter waited for the holder (whose lock was never broken, though it held it for ~4 leases) and decided
    # on the holder's champion
    assert released and done.previous == v1.version
    assert [(e["from"], e["to"], e["why"]) for e in _promotions(reg, name)] == [
        (None, v1.version, "holder"),
        (v1.version, v2.version, "waiter"),
    ]
    assert not _locks(reg, name)


_HOLD_AND_HANG = """
import sys, time
from registry.store import Registry, Settings
s = Settings.load(None, tracking_uri=sys.argv[1])
s.lock_lease_s = 0.5
with Registry(s).lock("promotion of a process that will be killed", sys.argv[2]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_lock_of_a_killed_holder_is_broken_after_its_lease(pg_registry, tmp_path):
    reg = pg_registry
    make_generator_dir(tmp_path / "g", seed=1)
    v1 = register_dir(reg, tmp_path / "g")
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_AND_HANG, reg.uri, v1.name],
        cwd=ROOT,
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "held"
    finally:
        proc.kill()  # SIGKILL: no release, no more renewals
        proc.wait(10)
    assert _locks(reg, v1.name) == [LOCK_PREFIX + v1.name]
    t0 = time.monotonic()
    done = promote(reg, v1.name, reason="after a crash")
    assert done.promoted and time.monotonic() - t0 >= reg.settings.lock_lease_s
    assert [(e["from"], e["to"]) for e in _promotions(reg, v1.name)] == [(None, v1.version)]
    assert not _locks(reg, v1.name)  # the dead holder's lock and the break marker are gone


def promote_worker(uri: str, name: str, barrier: str, plan: str, worker: str, locked: str = "1") -> None:
    """One of two processes promoting at the same moment: for each trial, wait at the barrier (file go-N), then
    promote this worker's version of the trial. `locked` "0" switches the registry lock off (to show the lost
    update it prevents)."""
    from registry.store import Registry, Settings

    if locked == "0":
        Registry.lock = lambda self, *a, **k: contextlib.nullcontext()
    s = Settings.load(None, tracking_uri=uri)
    s.generator_name, s.lock_lease_s = name, 5.0
    reg = Registry(s)
    reg.client.get_registered_model(name)  # connect before the first barrier: both start equally warm
    folder = Path(barrier)
    for trial, version in enumerate(json.loads(plan)):
        (folder / f"ready-{trial}-{worker}").touch()
        while not (folder / f"go-{trial}").exists():
            time.sleep(0.001)
        try:
            promote(reg, name, version, reason=f"trial {trial} worker {worker}")
            outcome = "ok"
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            outcome = f"{type(e).__name__}: {e}"
        (folder / f".done-{trial}-{worker}").write_text(outcome)
        (folder / f".done-{trial}-{worker}").rename(folder / f"done-{trial}-{worker}")  # seen whole or not at all


_WORKER = "import sys; from tests.test_shared_registry import promote_worker; promote_worker(*sys.argv[1:])"
TRIALS = 10


def race_promotions(reg, tmp_path: Path, trials: int, locked: bool = True):
    """Register 2 * `trials` + 1 versions of the generator, promote the first, then run `trials` races of two
    processes promoting one new version each at the same moment. Yields, after each trial, (the two workers'
    outcomes, the promotion events so far, the champion, the two versions of the trial)."""
    versions = []
    for i in range(2 * trials + 1):
        make_generator_dir(tmp_path / f"g{i}", seed=100 + i)
        versions.append(register_dir(reg, tmp_path / f"g{i}", alias=None).version)
    name = reg.settings.generator_name
    promote(reg, name, versions[0], reason="first champion")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    plans = {w: [versions[1 + 2 * t + k] for t in range(trials)] for k, w in enumerate("AB")}
    args = [reg.uri, name, str(barrier)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, *args, json.dumps(plans[w]), w, "1" if locked else "0"],
            cwd=ROOT,
            env=_env(tmp_path),
        )
        for w in "AB"
    ]
    try:
        for trial in range(trials):
            ready, finished = ([barrier / f"{stage}-{trial}-{w}" for w in "AB"] for stage in ("ready", "done"))
            wait_for(lambda paths=ready: all(p.exists() for p in paths), what="both workers at the barrier")
            (barrier / f"go-{trial}").touch()
            wait_for(lambda paths=finished: all(p.exists() for p in paths), what="both promotions")
            outcomes = [p.read_text() for p in finished]
            yield outcomes, _promotions(reg, name), _champion(reg, name), {plans["A"][trial], plans["B"][trial]}
    finally:
        for proc in workers:
            proc.kill()
            proc.wait(10)


def test_concurrent_promotions_from_two_processes_lose_no_update(pg_registry, tmp_path):
    """TRIALS times, two processes promote two different versions of the same model at the same moment. After
    each trial the champion is the `to` of the last promotion event, each event's `from` is the previous event's
    `to` (no promotion decided on a champion that had already moved), and both promotions are in the history."""
    reg = pg_registry
    with contextlib.closing(race_promotions(reg, tmp_path, TRIALS)) as trials:  # a failure stops the workers
        for trial, (outcomes, events, champion, pair) in enumerate(trials):
            assert outcomes == ["ok", "ok"], f"trial {trial}"
            assert len(events) == 1 + 2 * (trial + 1), f"trial {trial}: a promotion is missing from the history"
            for before, after in zip(events, events[1:]):
                assert after["from"] == before["to"], f"trial {trial}: lost update {before} / {after}"
            assert {e["to"] for e in events[-2:]} == pair
            assert champion == events[-1]["to"]
    assert trial == TRIALS - 1
    assert not _locks(reg, reg.settings.generator_name)


# ------------------------------------------------------------------------------------------------ failures
_KILL_SERVER_AFTER_ALIAS = """
import os, signal, sys
from mlflow import MlflowClient

set_alias = MlflowClient.set_registered_model_alias

def set_alias_then_lose_the_server(self, *args, **kwargs):
    result = set_alias(self, *args, **kwargs)
    os.killpg(int(os.environ["KILL_PGID"]), signal.SIGKILL)  # the server dies right after moving the alias
    return result

MlflowClient.set_registered_model_alias = set_alias_then_lose_the_server
from generation.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_server_killed_mid_registration(start_mlflow_server, tmp_path, capsys, monkeypatch):
    """The server dies between moving the challenger alias and recording the event: the command fails with one
    line, and once the server is back the half-registered version is never served, and the next promotion
    removes it (the alias back on the previous challenger, no event, no run), then the content registers anew."""
    from generation.cli import main

    server = start_mlflow_server()
    reg = registry_on(server.uri, tmp_path, "gone", lease_s=1.0)
    monkeypatch.setenv("SMITIN_CACHE_DIR", str(tmp_path / "cache"))
    fp = make_generator_dir(tmp_path / "g")
    register_dir(reg, tmp_path / "g")
    promote(reg, "generator")  # so that the probe set can be promoted below
    name = reg.model_name("probe_set", "drums")
    first = register_dir(reg, make_probe_set_dir(tmp_path / "p1", "drums", fp, seed=1))
    second = make_probe_set_dir(tmp_path / "p2", "drums", fp, seed=2)
    base = ["registry", "--tracking-uri", reg.uri, "--params", _params(reg, tmp_path, "  lock_lease_s: 1\n")]

    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _KILL_SERVER_AFTER_ALIAS, *base, "register", "--probes", f"drums={second}"],
        cwd=ROOT,
        env={**_env(tmp_path), "KILL_PGID": str(server.proc.pid)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == "", done.stderr
    line = rf"smitin: error: MLflow tracking server {reg.uri} is unreachable \(connection (refused|lost)\)\n"
    assert re.fullmatch(line, done.stderr), done.stderr  # one line: no traceback, no urllib3 retry warnings
    assert time.monotonic() - t0 < 30
    assert server.proc.poll() is not None

    server.proc.wait(10)
    server.start()  # same port, same PostgreSQL database
    reg = registry_on(server.uri, tmp_path, "gone", lease_s=1.0)
    c = reg.client
    half = [mv for mv in c.search_model_versions(f"name = '{name}'") if PENDING in mv.tags]
    assert [str(mv.version) for mv in half] == ["2"] and _locks(reg, name) == [LOCK_PREFIX + name]
    assert str(c.get_model_version_by_alias(name, "challenger").version) == "2"  # moved before the crash...
    with pytest.raises(RegistryError, match=rf"^{name} v2 is half-registered \(its registration is under way or"):
        fetch(reg, f"models:/{name}@challenger")  # ... but never served
    capsys.readouterr()
    assert main(base + ["fetch", f"models:/{name}/2"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(base + ["show", "drums"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[3:]}
    assert rows["2"][1] == "challenger" and rows["2"][-1] == "PENDING" and rows["1"][-1] == "READY"

    # the next command on the model breaks the dead command's lock (one lease) and removes the half version
    assert main(base + ["promote", "drums"]) == 0
    out = capsys.readouterr().out
    assert f"{name}: removed v2, left half-registered by an interrupted registration" in out
    assert f"{name}: champion none -> v1" in out  # the challenger is v1 again
    assert [str(mv.version) for mv in c.search_model_versions(f"name = '{name}'")] == ["1"]
    assert [(e["action"], e["to"]) for e in read_history(c, name)] == [("register", "1"), ("promote", "1")]
    assert c.get_run(half[0].run_id).info.lifecycle_stage == "deleted"
    assert c.get_run(first.run_id).info.status == "FINISHED"
    assert not _locks(reg, name)
    again = register_dir(reg, second)
    assert again.created and again.version == "3" and fetch(reg, f"models:/{name}@challenger").version == "3"


def test_database_down_behind_the_server_is_one_line(pg_mlflow_server, postgres, pg_registry, tmp_path, capsys):
    """PostgreSQL stops (crash) while the server stays up: a command says so in one line and fails; with the
    database back, the same command works."""
    from generation.cli import main

    reg = pg_registry
    make_generator_dir(tmp_path / "g", seed=1)
    register_dir(reg, tmp_path / "g")
    base = ["registry", "--tracking-uri", reg.uri, "--params", _params(reg, tmp_path)]
    postgres.stop("immediate")
    try:
        capsys.readouterr()
        assert main(base + ["promote", "generator"]) == 2
        err = capsys.readouterr().err
        says = r"answers HTTP 5\d\d to every retry: is its database up\? \(see the server's log\)"
        assert re.fullmatch(rf"smitin: error: MLflow tracking server {reg.uri} {says}\n", err), err
    finally:
        postgres.start()
    assert main(base + ["promote", "generator"]) == 0
    assert _champion(reg, reg.settings.generator_name) == "1"
