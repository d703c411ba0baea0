"""Registry: the full register -> gate -> promote -> history -> load cycle against the SQLite default and a real
`mlflow server`, lineage tags, and the reliability cases (server down, alias missing, corrupted artifact,
interrupted and concurrent registrations)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from registry.errors import (
    CorruptArtifact,
    IncompatibleProbeSet,
    InvalidArtifact,
    ModelNotFound,
    PromotionRefused,
    RegistrationBusy,
    RegistryUnavailable,
)
from registry.history import read_history
from registry.loading import check_compatible, fetch, resolve
from registry.promotion import history, promote
from registry.registration import register_dir
from tests.conftest_registry import ROOT, make_generator_dir, make_probe_set_dir

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(autouse=True, scope="module")
def _boot_server_early(mlflow_server):
    """Start the mlflow server when this module starts; SQLite tests run while it boots."""
    yield


def _dirs(tmp_path: Path):
    fp = make_generator_dir(tmp_path / "generator", seed=1, metrics={"val_loss": 3.9})
    good = make_probe_set_dir(tmp_path / "probes-good", "drums", fp, best_acc=0.85, seed=1)
    worse = make_probe_set_dir(tmp_path / "probes-worse", "drums", fp, best_acc=0.70, seed=2)
    better = make_probe_set_dir(tmp_path / "probes-better", "drums", fp, best_acc=0.95, seed=3)
    return fp, good, worse, better


def test_full_cycle(any_registry, tmp_path):
    reg = any_registry
    fp, good, worse, better = _dirs(tmp_path)
    gen = register_dir(reg, tmp_path / "generator")
    assert gen.created and gen.version == "1"
    assert promote(reg, "generator").promoted
    # a generator whose validation loss rose beyond its own tolerance is refused (lower is better)
    reg.settings.gates = reg.settings.gates.with_overrides(
        {"generator": {"val_loss": {"better": "lower", "tolerance": 0.05}}}, "test"
    )
    make_generator_dir(tmp_path / "generator-worse", seed=9, metrics={"val_loss": 4.2})
    register_dir(reg, tmp_path / "generator-worse")
    with pytest.raises(PromotionRefused, match=r"val_loss 4.2 > champion v1 3.9 \+ tolerance 0.05"):
        promote(reg, "generator")

    v1 = register_dir(reg, good)
    assert promote(reg, "drums").promoted  # the challenger, first champion
    v2 = register_dir(reg, worse)
    assert (v1.version, v2.version) == ("1", "2")
    c = reg.client
    name = reg.model_name("probe_set", "drums")
    assert str(c.get_model_version_by_alias(name, "challenger").version) == "2"

    with pytest.raises(PromotionRefused) as refused:
        promote(reg, "drums", reason="try the worse one")
    msg = str(refused.value)
    assert "\n" not in msg and "gate metrics failed" in msg and "best_acc 0.7 < champion v1 0.85" in msg
    assert str(c.get_model_version_by_alias(name, "champion").version) == "1"

    v3 = register_dir(reg, better)
    done = promote(reg, "drums", v3.version, reason="better probes")
    assert done.promoted and not done.forced and done.previous == "1"
    assert {g.name for g in done.gates} == {"ready", "metrics", "compatible"} and not done.failed

    # loading by alias gives exactly the new champion's files
    local = fetch(reg, f"models:/{name}@champion")
    assert local.version == "3" and not local.cached
    assert (local.path / "probes.safetensors").read_bytes() == (better / "probes.safetensors").read_bytes()
    assert fetch(reg, f"models:/{name}@champion").cached
    check_compatible(local, fetch(reg, f"models:/{reg.settings.generator_name}@champion"))

    _, events = history(reg, "drums")
    promotions = [(e["action"], e["from"], e["to"], e["why"]) for e in events if e["alias"] == "champion"]
    assert promotions == [
        ("promote", None, "1", ""),
        ("refused", "1", "2", "try the worse one"),
        ("promote", "1", "3", "better probes"),
    ]
    assert all(e["who"] and e["when"].endswith("Z") for e in events)
    assert [e["to"] for e in events if e["action"] == "register"] == ["1", "2", "3"]

    # metrics live on the run, the logged model and the version; lineage tags on all three
    mv = c.get_model_version(name, "3")
    assert json.loads(mv.tags["smitin.metrics"])["best_acc"] == pytest.approx(0.95)
    assert mv.tags["smitin.generator_fingerprint"] == fp and mv.tags["smitin.generator_version"] == "1"
    assert len(mv.tags["smitin.git_commit"]) == 40 and mv.tags["smitin.data_hash"] == "data3"
    run = c.get_run(mv.run_id)
    assert run.data.metrics["best_acc"] == pytest.approx(0.95) and run.data.params["params.position"] == "last"
    assert run.data.tags["mlflow.source.git.commit"] == mv.tags["smitin.git_commit"]
    assert run.info.status == "FINISHED"


def test_compatibility_gate_and_forced_promotion(any_registry, tmp_path):
    reg = any_registry
    fp = make_generator_dir(tmp_path / "gen-a", seed=1)
    other_fp = make_generator_dir(tmp_path / "gen-b", seed=2)
    register_dir(reg, tmp_path / "gen-a")
    promote(reg, "generator")
    foreign = register_dir(reg, make_probe_set_dir(tmp_path / "foreign", "piano", other_fp, best_acc=0.9))
    with pytest.raises(PromotionRefused, match="gate compatible failed: trained on generator 0002ababab"):
        promote(reg, "piano")
    forced = promote(reg, "piano", foreign.version, force=True, reason="demo only")
    assert forced.promoted and forced.forced
    last = history(reg, "piano")[1][-1]
    assert last["action"] == "force-promote" and last["overridden"] == ["compatible"] and last["why"] == "demo only"

    name = reg.model_name("probe_set", "piano")
    with pytest.raises(IncompatibleProbeSet) as e:
        check_compatible(
            fetch(reg, f"models:/{name}@champion"), fetch(reg, f"models:/{reg.settings.generator_name}@champion")
        )
    assert f"{name} v1" in str(e.value) and f"{reg.settings.generator_name} v1" in str(e.value)
    assert other_fp[:12] in str(e.value) and fp[:12] in str(e.value)


def test_same_content_is_not_registered_twice(sqlite_registry, tmp_path):
    fp = make_generator_dir(tmp_path / "g")
    p = make_probe_set_dir(tmp_path / "p", "drums", fp)
    first, again = register_dir(sqlite_registry, p), register_dir(sqlite_registry, p)
    assert first.created and not again.created and again.version == first.version
    assert len(sqlite_registry.client.search_model_versions("name = 'smitin-probes-drums'")) == 1


def test_lineage_from_dvc_lock(sqlite_registry, tmp_path, monkeypatch):
    fp = make_generator_dir(tmp_path / "models" / "generator")
    make_probe_set_dir(tmp_path / "models" / "probes" / "drums", "drums", fp)
    (tmp_path / "dvc.lock").write_text("""schema: '2.0'
stages:
  build_dataset:
    cmd: smitin dataset build
    deps: [{path: data/corpus/audio, md5: aaa.dir}]
    outs: [{path: data/clips, md5: c11b5.dir, size: 10, nfiles: 2}]
  train_generator:
    cmd: smitin model train
    deps: [{path: data/clips, md5: c11b5.dir}]
    outs: [{path: models/generator, md5: 9e4.dir}]
  train_probes@drums:
    cmd: smitin probes train --trait drums
    deps: [{path: models/generator, md5: 9e4.dir}, {path: data/clips, md5: c11b5.dir}]
    outs: [{path: models/probes/drums, md5: d7a.dir}]
  train_probes@piano:
    cmd: smitin probes train --trait piano
    deps: [{path: models/generator, md5: 9e4.dir}]
    outs: [{path: models/probes/piano, md5: 1f0.dir}]
""")
    monkeypatch.chdir(tmp_path)
    r = register_dir(sqlite_registry, "models/probes/drums")
    tags = sqlite_registry.client.get_model_version(r.name, r.version).tags
    assert tags["smitin.dvc/train_probes/drums"] == "d7a.dir"
    assert tags["smitin.dvc/train_generator"] == "9e4.dir" and tags["smitin.dvc/build_dataset"] == "c11b5.dir"
    assert "smitin.dvc/train_probes/piano" not in tags
    assert tags["smitin.clips_table_hash"] == "c11b5.dir"
    run_tags = sqlite_registry.client.get_run(r.run_id).data.tags
    assert run_tags["smitin.dvc/train_probes/drums"] == "d7a.dir"


# ------------------------------------------------------------------------------------------------ reliability
def test_unreachable_server_is_one_line(tmp_path, monkeypatch):
    from registry.store import Registry
    from tests.conftest_registry import _free_port, _settings

    reg = Registry(_settings(tmp_path, f"http://127.0.0.1:{_free_port()}"))
    fp = make_generator_dir(tmp_path / "g")
    t0 = time.monotonic()
    with pytest.raises(RegistryUnavailable) as e:
        register_dir(reg, make_probe_set_dir(tmp_path / "p", "drums", fp))
    assert "is unreachable (connection refused)" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(RegistryUnavailable):
        fetch(reg, "models:/smitin-generator@champion")
    assert time.monotonic() - t0 < 15


def test_missing_alias_model_and_version(any_registry, tmp_path):
    reg = any_registry
    fp = make_generator_dir(tmp_path / "g")
    register_dir(reg, make_probe_set_dir(tmp_path / "p", "drums", fp))
    name = reg.model_name("probe_set", "drums")
    with pytest.raises(
        ModelNotFound,
        match=r"has no version with alias 'champion' \(aliases: challenger->v1\); "
        r"promote one with",
    ):
        fetch(reg, f"models:/{name}@champion")
    with pytest.raises(ModelNotFound, match="has no version 7"):
        resolve(reg, f"models:/{name}/7")
    with pytest.raises(ModelNotFound, match=f"no registered model '{reg.settings.probe_set_prefix}bass'.*registered: "):
        fetch(reg, f"models:/{reg.settings.probe_set_prefix}bass@champion")


def test_missing_sqlite_registry_is_one_line(tmp_path):
    from registry.store import Registry
    from tests.conftest_registry import _settings

    reg = Registry(_settings(tmp_path, f"sqlite:///{tmp_path}/nope.db"))
    with pytest.raises(ModelNotFound, match="no MLflow registry at"):
        fetch(reg, "models:/smitin-generator@champion")
    assert not (tmp_path / "nope.db").exists()


@pytest.mark.parametrize(
    "section, message",
    [
        ({"lock_timout_s": 5}, "registry.lock_timout_s: Extra inputs are not permitted"),
        ({"lock_timeout_s": "soon"}, "registry.lock_timeout_s: Input should be a valid number"),
        ({"register": {"probe_set": "x"}}, "registry.register.probe_set: Extra inputs are not permitted"),
        ({"gates": {"coconet": {"nll": "smaller"}}}, "registry.gates.coconet.nll.better: Input should be 'higher'"),
    ],
)
def test_bad_registry_params_are_one_line_errors(tmp_path, capsys, section, message):
    """A misspelt key or a wrong type in params.yaml `registry` is one line naming it, before the registry is used."""
    import yaml

    from generation.cli import main

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"registry": section}))
    assert main(["registry", "--params", str(tmp_path / "params.yaml"), "list"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"smitin: error: {tmp_path / 'params.yaml'}: {message}"), err


def test_corrupted_artifact_is_refused_and_cache_repaired(sqlite_registry, tmp_path):
    reg = sqlite_registry
    fp = make_generator_dir(tmp_path / "g")
    r = register_dir(reg, make_probe_set_dir(tmp_path / "p", "drums", fp))
    uri = f"models:/{r.name}/{r.version}"
    stored = next((tmp_path / "mlartifacts").rglob("probes.safetensors"))
    original = stored.read_bytes()
    stored.write_bytes(original[:-4] + b"\x00\x00\x00\x00")  # same size, different bytes
    with pytest.raises(CorruptArtifact, match=r"probes.safetensors is corrupted \(sha256"):
        fetch(reg, uri)
    assert not any(p.name != "." and not p.name.startswith(".") for p in (tmp_path / "cache").iterdir())
    stored.write_bytes(original)
    good = fetch(reg, uri)
    (good.path / "probes.safetensors").write_bytes(b"x")  # a damaged cache entry is fetched again
    again = fetch(reg, uri)
    assert not again.cached and (again.path / "probes.safetensors").read_bytes() == original
    (tmp_path / "mlartifacts").joinpath(stored.relative_to(tmp_path / "mlartifacts")).unlink()
    shutil.rmtree(again.path)
    with pytest.raises(CorruptArtifact, match="probes.safetensors is missing"):
        fetch(reg, uri)


def test_invalid_directories_are_refused_before_anything_is_logged(sqlite_registry, tmp_path):
    fp = make_generator_dir(tmp_path / "g")
    p = make_probe_set_dir(tmp_path / "p", "drums", fp)
    (p / "probes.safetensors").write_bytes((p / "probes.safetensors").read_bytes()[:-10])
    with pytest.raises(InvalidArtifact, match="not a valid safetensors file"):
        register_dir(sqlite_registry, p)
    (p / "probes.safetensors").unlink()
    with pytest.raises(InvalidArtifact, match="probes.safetensors is missing"):
        register_dir(sqlite_registry, p)
    assert not sqlite_registry.client.search_registered_models()


@pytest.mark.parametrize("step", ["run", "artifacts", "logged_model", "version", "alias"])
def test_failed_registration_leaves_nothing_behind(sqlite_registry, tmp_path, step):
    reg = sqlite_registry
    fp = make_generator_dir(tmp_path / "g")
    first = register_dir(reg, make_probe_set_dir(tmp_path / "p1", "drums", fp, seed=1))
    with pytest.raises(RuntimeError, match=f"injected failure after {step}"):
        register_dir(reg, make_probe_set_dir(tmp_path / "p2", "drums", fp, seed=2), _fail_after=step)
    c = reg.client
    versions = c.search_model_versions("name = 'smitin-probes-drums'")
    assert [str(v.version) for v in versions] == ["1"]
    assert str(c.get_model_version_by_alias("smitin-probes-drums", "challenger").version) == first.version
    exp = c.get_experiment_by_name("smitin")
    assert [r.info.run_id for r in c.search_runs([exp.experiment_id])] == [first.run_id]
    stored = list((tmp_path / "mlartifacts" / "models").glob("m-*"))
    assert len(stored) == 1
    events = [e["to"] for e in read_history(c, "smitin-probes-drums")]
    assert events == ["1"]
    # and the next registration of the same content works normally (version numbers are never reused)
    again = register_dir(reg, tmp_path / "p2")
    assert (
        again.created
        and str(c.get_model_version_by_alias("smitin-probes-drums", "challenger").version) == again.version
    )


def test_failed_registration_on_server_is_rolled_back(server_registry, tmp_path):
    reg = server_registry
    fp = make_generator_dir(tmp_path / "g")
    with pytest.raises(RuntimeError):
        register_dir(reg, make_probe_set_dir(tmp_path / "p", "drums", fp), _fail_after="version")
    assert not reg.client.search_model_versions(f"name = '{reg.model_name('probe_set', 'drums')}'")


def test_two_registrations_at_once(sqlite_registry, tmp_path):
    """A `smitin registry register` process and an in-process registration overlap: the second waits for the
    registry lock, both versions land complete, numbered 1 and 2."""
    reg = sqlite_registry
    fp = make_generator_dir(tmp_path / "g")
    a = make_probe_set_dir(tmp_path / "a", "drums", fp, seed=1)
    b = make_probe_set_dir(tmp_path / "b", "drums", fp, seed=2)
    env = {**os.environ, "SMITIN_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    reg.check(create=True)
    lock = reg.lock_path()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "generation.cli",
            "registry",
            "--tracking-uri",
            reg.uri,
            "register",
            "--probes",
            f"drums={a}",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if lock.exists() and "registration of smitin-probes-drums" in lock.read_text():
            break  # the other process is registering right now
        time.sleep(0.005)
    mine = register_dir(reg, b)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    versions = sorted(str(v.version) for v in reg.client.search_model_versions("name = 'smitin-probes-drums'"))
    assert versions == ["1", "2"]
    theirs = out.strip().split("as version ")[1][0]
    assert {theirs, mine.version} == {"1", "2"}
    for v in versions:
        assert fetch(reg, f"models:/smitin-probes-drums/{v}").path.is_dir()


def test_busy_registry_lock_is_one_line(sqlite_registry, tmp_path):
    reg = sqlite_registry
    reg.settings.lock_timeout_s = 0.3
    fp = make_generator_dir(tmp_path / "g")
    reg.check(create=True)
    reg.lock_path().parent.mkdir(parents=True, exist_ok=True)
    with open(reg.lock_path(), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("registration of smitin-probes-drums (pid 4242)")
        f.flush()
        with pytest.raises(
            RegistrationBusy, match=r"another registration of smitin-probes-drums \(pid 4242\) has held"
        ):
            register_dir(reg, make_probe_set_dir(tmp_path / "p", "drums", fp))


def test_concurrent_registrations_on_server(server_registry, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    reg = server_registry
    fp = make_generator_dir(tmp_path / "g")
    dirs = [make_probe_set_dir(tmp_path / f"p{i}", "drums", fp, seed=i) for i in range(2)]
    register_dir(reg, dirs[0])  # the registered model exists; the two racers then only add versions
    more = [make_probe_set_dir(tmp_path / f"q{i}", "drums", fp, seed=10 + i) for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda d: register_dir(reg, d), more))
    assert sorted(r.version for r in done) == ["2", "3"]
    name = reg.model_name("probe_set", "drums")
    assert len(reg.client.search_model_versions(f"name = '{name}'")) == 3


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_list_show_promote_history(sqlite_registry, tmp_path, capsys, monkeypatch):
    from generation.cli import main

    reg = sqlite_registry
    monkeypatch.setenv("SMITIN_CACHE_DIR", str(tmp_path / "cache"))
    fp, good, worse, better = _dirs(tmp_path)
    base = ["registry", "--tracking-uri", reg.uri, "--params", str(tmp_path / "none.yaml")]
    assert (
        main(
            base
            + [
                "register",
                "--generator",
                str(tmp_path / "generator"),
                "--probes",
                str(good),
                "--out",
                str(tmp_path / "registered.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "registered.json").read_text())["smitin-probes-drums"]["version"] == 1
    assert main(base + ["promote", "generator"]) == 0
    assert main(base + ["promote", "drums"]) == 0
    assert main(base + ["register", "--probes", f"drums={worse}"]) == 0
    capsys.readouterr()
    assert main(base + ["promote", "drums"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("smitin: error: smitin-probes-drums v2 not promoted: gate metrics")
    assert main(base + ["list"]) == 0
    out = capsys.readouterr().out
    assert "smitin-probes-drums  2         v2      v1        v2          best_acc=0.850" in out
    assert main(base + ["show", "drums"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "smitin-probes-drums: 2 version(s)"
    assert out[3].startswith("1        champion") and out[4].startswith("2        challenger")
    assert main(base + ["history", "drums"]) == 0
    out = capsys.readouterr().out
    assert "promote   champion    -     v1" in out and "refused   champion    v1    v2" in out
    assert main(base + ["fetch", "models:/smitin-probes-drums@nope"]) == 2
    assert "has no version with alias 'nope'" in capsys.readouterr().err


def test_dvc_stage_registers_from_params_and_gates_on_steering_metrics(sqlite_registry, tmp_path, monkeypatch, capsys):
    """`smitin registry register` with no paths reads params.yaml (the DVC stage): the generator, each trait of
    probes.traits, the trait's subtree of the steering evaluation as steering.* metrics, plots; then a probe set
    whose steering success dropped is refused by the gate on that metric."""
    from generation.cli import main

    reg = sqlite_registry
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SMITIN_CACHE_DIR", str(tmp_path / "cache"))
    fp = make_generator_dir(tmp_path / "data" / "generator", metrics={"valid_loss": 3.9})
    make_probe_set_dir(tmp_path / "data" / "probes" / "drums", "drums", fp, best_acc=0.9, seed=1)
    (tmp_path / "plots" / "probes" / "drums").mkdir(parents=True)
    (tmp_path / "plots" / "probes" / "drums" / "accuracy_heatmap.png").write_bytes(b"\x89PNG fake")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "train_generator.json").write_text(json.dumps({"valid_loss": 3.8, "steps": 30}))
    steering = {
        "detector": {"auc": 0.9},
        "drums": {
            "probe_best_acc": 0.9,
            "continuation": {"add": {"smitin": {"success": 0.6, "frechet": 1.2}, "none": {"success": 0.1}}},
        },
    }
    (tmp_path / "metrics" / "evaluate_steering.json").write_text(json.dumps(steering))
    (tmp_path / "params.yaml").write_text("""
probes:
  traits:
    drums: {source: {kind: stems}}
registry:
  register:
    generator: data/generator
    generator_metrics: metrics/train_generator.json
    probe_sets: data/probes/{trait}
    steering_metrics: metrics/evaluate_steering.json
    plots: ["plots/probes/{trait}/accuracy_heatmap.png"]
  gates:
    tolerance: 0.05
    probe_set: {best_acc: higher, steering.continuation.add.smitin.success: higher}
""")
    base = ["registry", "--tracking-uri", reg.uri, "--params", "params.yaml"]
    assert main(base + ["register", "--out", "metrics/registry.json"]) == 0
    assert json.loads((tmp_path / "metrics" / "registry.json").read_text()) == {
        "smitin-generator": {
            "version": 1,
            "new": True,
            "content_hash": json.loads((tmp_path / "metrics" / "registry.json").read_text())["smitin-generator"][
                "content_hash"
            ],
        },
        "smitin-probes-drums": {
            "version": 1,
            "new": True,
            "content_hash": json.loads((tmp_path / "metrics" / "registry.json").read_text())["smitin-probes-drums"][
                "content_hash"
            ],
        },
    }
    c = reg.client
    mv = c.get_model_version("smitin-probes-drums", "1")
    metrics = json.loads(mv.tags["smitin.metrics"])
    assert metrics["steering.continuation.add.smitin.success"] == 0.6 and "steering.detector.auc" not in metrics
    assert json.loads(c.get_model_version("smitin-generator", "1").tags["smitin.metrics"])["valid_loss"] == 3.8
    assert [a.path for a in c.list_artifacts(mv.run_id, "plots")] == ["plots/accuracy_heatmap.png"]
    # the stage re-run with nothing changed registers nothing new
    capsys.readouterr()
    assert main(base + ["register"]) == 0
    assert capsys.readouterr().out.count("already registered as version 1") == 2

    assert main(base + ["promote", "generator"]) == 0 and main(base + ["promote", "drums"]) == 0
    make_probe_set_dir(tmp_path / "data" / "probes" / "drums", "drums", fp, best_acc=0.92, seed=2)
    steering["drums"]["continuation"]["add"]["smitin"]["success"] = 0.3
    (tmp_path / "metrics" / "evaluate_steering.json").write_text(json.dumps(steering))
    assert main(base + ["register"]) == 0
    capsys.readouterr()
    assert main(base + ["promote", "drums"]) == 2
    err = capsys.readouterr().err
    assert "steering.continuation.add.smitin.success 0.3 < champion v1 0.6 - tolerance 0.05" in err
    assert "best_acc" not in err  # 0.92 is better: only the failing metric is named


def test_steering_gate_compares_success_only_at_equal_settings():
    """A probe set evaluated at another steering strength or push interval is not held to the champion's success
    there (the numbers answer different questions); with equal settings a drop still refuses, and the gate says what
    it skipped."""
    from types import SimpleNamespace

    from registry.promotion import metric_gate
    from registry.store import TAG, GatesParams

    def version(n, metrics):
        return SimpleNamespace(version=n, tags={TAG + "metrics": json.dumps(metrics)})

    key = "steering.continuation.add.smitin"
    gates = GatesParams(tolerance=0.01, probe_set={f"{key}.success": "higher", "best_acc": "higher"})
    champion = version(1, {f"{key}.success": 0.56, f"{key}.strength": 5.0, "best_acc": 0.85})
    stronger = version(2, {f"{key}.success": 0.50, f"{key}.strength": 10.0, "best_acc": 0.85})
    gate = metric_gate(stronger, champion, gates, "probe_set")
    assert gate.passed, gate
    assert "best_acc within tolerance" in gate.detail
    assert f"not compared, measured with other settings: {key}.success (strength 10 vs 5)" in gate.detail
    same = version(3, {f"{key}.success": 0.19, f"{key}.strength": 5.0, "best_acc": 0.85})
    gate = metric_gate(same, champion, gates, "probe_set")
    assert not gate.passed and f"{key}.success 0.19 < champion v1 0.56" in gate.detail
    # a champion registered before strengths were recorded is compared as before
    old = version(4, {f"{key}.success": 0.56, "best_acc": 0.85})
    assert not metric_gate(stronger, old, gates, "probe_set").passed
    # SMITIN's push interval: every step vs every 5th is another setting, even at the same strength
    champion = version(5, {f"{key}.success": 0.56, f"{key}.strength": 10.0, f"{key}.every": 5, "best_acc": 0.85})
    sparse = version(6, {f"{key}.success": 0.40, f"{key}.strength": 10.0, f"{key}.every": 1, "best_acc": 0.85})
    gate = metric_gate(sparse, champion, gates, "probe_set")
    assert gate.passed and f"{key}.success (every 1 vs 5)" in gate.detail, gate
    both = version(7, {f"{key}.success": 0.40, f"{key}.strength": 20.0, f"{key}.every": 1, "best_acc": 0.85})
    assert f"{key}.success (strength 20 vs 10, every 1 vs 5)" in metric_gate(both, champion, gates, "probe_set").detail
    # a champion that recorded no interval (registered before it was logged) is compared at equal strength
    no_interval = version(8, {f"{key}.success": 0.56, f"{key}.strength": 10.0, "best_acc": 0.85})
    assert not metric_gate(sparse, no_interval, gates, "probe_set").passed
    # success judged by the detector and the strength judge (judge 2) is not the detector's alone: a champion that
    # recorded no judge was judged the old way, and so was one evaluated with the paper's monitor (no hold)
    judged = version(9, {f"{key}.success": 0.40, f"{key}.strength": 10.0, f"{key}.judge": 2.0, "best_acc": 0.85})
    gate = metric_gate(judged, no_interval, gates, "probe_set")
    assert gate.passed and f"{key}.success (judge 2 vs 1)" in gate.detail, gate
    held = version(10, {f"{key}.success": 0.40, f"{key}.strength": 10.0, f"{key}.hold_steps": 20.0, "best_acc": 0.85})
    gate = metric_gate(held, no_interval, gates, "probe_set")
    assert gate.passed and f"{key}.success (hold_steps 20 vs 0)" in gate.detail, gate
    # the push's fade: a version that logged none pushed with exponent 0.5
    faded = version(12, {f"{key}.success": 0.40, f"{key}.strength": 10.0, f"{key}.decay": 1.0, "best_acc": 0.85})
    gate = metric_gate(faded, no_interval, gates, "probe_set")
    assert gate.passed and f"{key}.success (decay 1 vs 0.5)" in gate.detail, gate
    # an added trait's push multiple: a version that logged none pushed at its strength (gain 1)
    pulsed = version(14, {f"{key}.success": 0.40, f"{key}.strength": 10.0, f"{key}.gain": 2.0, "best_acc": 0.85})
    gate = metric_gate(pulsed, no_interval, gates, "probe_set")
    assert gate.passed and f"{key}.success (gain 2 vs 1)" in gate.detail, gate
    # the monitor reading the generated audio's share after a prompt: a version that logged none read the probes as is
    relative = {f"{key}.success": 0.40, f"{key}.strength": 10.0, f"{key}.prompt_relative": 1.0, "best_acc": 0.85}
    gate = metric_gate(version(15, relative), no_interval, gates, "probe_set")
    assert gate.passed and f"{key}.success (prompt_relative 1 vs 0)" in gate.detail, gate
    same_fade = version(13, {f"{key}.success": 0.20, f"{key}.strength": 10.0, f"{key}.decay": 0.5, "best_acc": 0.85})
    assert not metric_gate(same_fade, no_interval, gates, "probe_set").passed  # 0.5 logged = 0.5 assumed: compared
    worse = version(11, {f"{key}.success": 0.20, f"{key}.strength": 10.0, f"{key}.judge": 2.0, "best_acc": 0.85})
    gate = metric_gate(worse, judged, gates, "probe_set")  # judged alike: compared, and a drop refuses
    assert not gate.passed and f"{key}.success 0.2 < champion v9 0.4" in gate.detail, gate
