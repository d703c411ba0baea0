"""Log and register a generator or probe-set directory as a new model version (alias `challenger`).

One registration = one MLflow run (params, metrics, lineage tags, plots) + one LoggedModel (the directory's files
as plain artifacts + a sha256 manifest, the same metrics) + one model version (lineage tags, `smitin.metrics`).
Either all of it exists at the end or none of it: a failure at any step rolls back what was made. When the rollback
cannot run (the process was killed, the server went away), the version still carries the tag `smitin.pending`: it
is never served, promoted or taken for registered content, and the next registration or promotion of the model
removes it (`clean_interrupted`). The same content registered twice gives back the existing version (the DVC stage
can re-run safely)."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from registry.artifacts import ArtifactInfo, inspect_dir, numeric, verify_dir, write_manifest
from registry.errors import RegistryError
from registry.history import HISTORY_PREFIX, now_iso, record_event, who
from registry.lineage import dvc_lineage, git_state
from registry.store import (
    CHALLENGER,
    PENDING,
    TAG,
    RegisterParams,
    Registry,
    first_line,
    is_unreachable,
    translate_errors,
)


@dataclass
class Registered:
    name: str
    version: str
    model_id: str
    run_id: str
    content_hash: str
    created: bool  # False: this content was already registered as `version`
    cleaned: list[str] = field(default_factory=list)  # versions of interrupted registrations removed first

    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _find_by_content(client, name: str, content_hash: str):
    for mv in client.search_model_versions(f"name = '{name}'"):
        if mv.tags.get(TAG + "content_hash") == content_hash and mv.status == "READY" and PENDING not in mv.tags:
            return mv
    return None


def _generator_version(reg: Registry, fingerprint: str) -> str:
    """The registered generator version with this fingerprint (the newest if several), or 'unregistered'."""
    c = reg.client
    name = reg.settings.generator_name
    if not c.search_registered_models(f"name = '{name}'"):
        return "unregistered"
    versions = [
        int(mv.version)
        for mv in c.search_model_versions(f"name = '{name}'")
        if mv.tags.get(TAG + "fingerprint") == fingerprint
    ]
    return str(max(versions)) if versions else "unregistered"


def _ensure_registered_model(reg: Registry, name: str, info: ArtifactInfo) -> None:
    from mlflow.exceptions import MlflowException

    c = reg.client
    if c.search_registered_models(f"name = '{name}'"):
        return
    what = (
        "the smitin generator (with its codec)"
        if info.kind == "generator"
        else "Coconet, the four-part chorale model (harmonize / infill / compose)"
        if info.kind == "coconet"
        else f"SMITIN probe sets for the trait '{info.trait}'"
        + (
            " on Hugging Face MusicGen (weights referenced by local path + fingerprint, not registered)"
            if info.generator_info.get("backend") == "musicgen"
            else ""
        )
    )
    try:
        c.create_registered_model(
            name,
            tags={TAG + "kind": info.kind, **({TAG + "trait": info.trait} if info.trait else {})},
            description=f"{what}; aliases: champion (serving), challenger (newest registered)",
        )
    except MlflowException as e:
        if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise


def register_dir(
    reg: Registry,
    directory: str | Path,
    kind: str | None = None,
    *,
    trait: str | None = None,
    extra_metrics: dict | None = None,
    plots: list[str | Path] = (),
    lineage: dict | None = None,
    description: str = "",
    alias: str | None = CHALLENGER,
    _fail_after: str | None = None,
) -> Registered:
    """Register one directory. `lineage` tags override the computed ones (git, dvc.lock). `_fail_after` is a
    test hook: raise after the named step to exercise the rollback."""
    info = inspect_dir(directory, kind)
    if trait and info.trait and trait != info.trait:
        raise RegistryError(f"{directory} is a probe set for '{info.trait}', not '{trait}'")
    backend = str(info.generator_info.get("backend") or "builtin")
    name = reg.model_name(info.kind, info.trait, backend)
    metrics = {**info.metrics, **numeric(extra_metrics or {})}
    reg.check(create=True)
    with translate_errors(reg), reg.lock(f"registration of {name}", name):
        _ensure_registered_model(reg, name, info)
        cleaned = clean_interrupted(reg, name)
        existing = _find_by_content(reg.client, name, info.content_hash)
        if existing is not None:
            return Registered(
                name,
                str(existing.version),
                existing.model_id or "",
                existing.run_id or "",
                info.content_hash,
                created=False,
                cleaned=cleaned,
            )
        tags = {"kind": info.kind, "content_hash": info.content_hash, "registered_by": who(), **git_state(".")}
        tags.update(dvc_lineage(directory))
        if info.kind in ("generator", "coconet"):
            tags["fingerprint"] = info.fingerprint
            if info.kind == "coconet":
                tags["data_hash"] = str(info.meta.get("data_hash", ""))
        elif backend == "musicgen":
            # the MusicGen weights are not registered (gigabytes, and the user's own copy): a reference + fingerprint
            g = info.generator_info
            tags.update(
                trait=info.trait,
                generator_fingerprint=info.generator_fingerprint,
                generator_backend="musicgen",
                generator_path=str(g.get("path") or ""),
                generator_version="unregistered",
                generator_shape=f"{g.get('n_layers')}x{g.get('n_heads')}x{g.get('head_dim')}",
                data_hash=str(info.meta.get("data_hash", "")),
            )
        else:
            tags.update(
                trait=info.trait,
                generator_fingerprint=info.generator_fingerprint,
                generator_version=_generator_version(reg, info.generator_fingerprint),
                data_hash=str(info.meta.get("data_hash", "")),
            )
        tags.update({k: str(v) for k, v in (lineage or {}).items()})
        tags = {TAG + k: str(v) for k, v in tags.items()}
        done = _register(reg, info, name, metrics, tags, plots, description, alias, _fail_after)
        done.cleaned = cleaned
        return done


def _register(
    reg: Registry,
    info: ArtifactInfo,
    name: str,
    metrics: dict,
    tags: dict,
    plots,
    description: str,
    alias: str | None,
    fail_after: str | None,
) -> Registered:
    from mlflow.entities import Metric, Param

    c = reg.client
    made: dict = {}

    def step(label: str) -> None:
        if fail_after == label:
            raise RuntimeError(f"injected failure after {label}")

    try:
        exp_id = reg.experiment_id()
        short = name.removeprefix("smitin-")
        run_tags = {
            **tags,
            PENDING: name,  # a run left by an interrupted registration is found (and removed) by this tag
            "mlflow.runName": f"register-{short}",
            "mlflow.user": who(),
            "mlflow.source.name": "smitin registry register",
            "mlflow.source.type": "LOCAL",
        }
        if tags.get(TAG + "git_commit", "unknown") != "unknown":
            run_tags["mlflow.source.git.commit"] = tags[TAG + "git_commit"]
        run = c.create_run(exp_id, run_name=f"register-{short}", tags=run_tags)
        made["run"] = run.info.run_id
        params = {k: str(v)[:6000] for k, v in info.params.items()}
        items = sorted(params.items())
        for i in range(0, len(items), 100):
            c.log_batch(run.info.run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
        for plot in plots:
            plot = Path(plot)
            if plot.is_dir():
                c.log_artifacts(run.info.run_id, str(plot), "plots")
            elif plot.is_file():
                c.log_artifact(run.info.run_id, str(plot), "plots")
        step("run")
        lm = c.create_logged_model(
            exp_id,
            name=short,
            source_run_id=run.info.run_id,
            tags=tags,
            params=dict(items[:100]),
            model_type=f"smitin-{info.kind}",
        )
        made["logged_model"] = lm
        c.log_model_artifacts(lm.model_id, str(info.path))
        with tempfile.TemporaryDirectory() as tmp:
            write_manifest(info, Path(tmp))
            c.log_model_artifacts(lm.model_id, tmp)
        if lm.artifact_location.startswith("file:"):
            # Local store: check the stored copy is what was hashed (the source could change under us).
            from urllib.parse import urlparse
            from urllib.request import url2pathname

            verify_dir(
                Path(url2pathname(urlparse(lm.artifact_location).path)),
                info.content_hash,
                what=f"stored copy of {info.path}",
            )
        step("artifacts")
        ts = int(time.time() * 1000)
        batch = [Metric(k, v, ts, 0, model_id=lm.model_id) for k, v in sorted(metrics.items())]
        for i in range(0, len(batch), 1000):
            c.log_batch(run.info.run_id, metrics=batch[i : i + 1000])
        c.finalize_logged_model(lm.model_id, "READY")
        step("logged_model")
        # what an interrupted registration needs undone: the alias it may have moved, from which version
        previous = _alias_version(c, name, alias) if alias else None
        pending = json.dumps({"alias": alias, "previous": previous, "since": now_iso(), "who": who()})
        mv_tags = {**tags, TAG + "metrics": json.dumps(metrics, sort_keys=True), PENDING: pending}
        mv = c.create_model_version(
            name,
            source=lm.artifact_location,
            run_id=run.info.run_id,
            tags=mv_tags,
            model_id=lm.model_id,
            description=description or f"registered from {info.path} by {who()}",
        )
        made["version"] = str(mv.version)
        step("version")
        if alias:
            made["alias"] = (alias, previous)
            c.set_registered_model_alias(name, alias, str(mv.version))
            made["event"] = record_event(
                c,
                name,
                {
                    "action": "register",
                    "alias": alias,
                    "from": previous,
                    "to": str(mv.version),
                    "why": f"registered {info.path.name} ({info.content_hash[:12]})",
                },
            )
        step("alias")
        # The commit point: from here on the version is complete (served, promotable, found by content).
        c.delete_model_version_tag(name, str(mv.version), PENDING)
        made.clear()
        _finish_run(c, run.info.run_id)
        return Registered(name, str(mv.version), lm.model_id, run.info.run_id, info.content_hash, created=True)
    except BaseException as e:
        if made:
            _rollback(reg, name, made, alias)
        if isinstance(e, RegistryError):
            raise
        if isinstance(e, Exception):
            with translate_errors(reg):
                raise
        raise


def _alias_version(client, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception:  # noqa: BLE001 - no such alias
        return None


def _rollback(reg: Registry, name: str, made: dict, alias: str | None) -> None:
    """Undo a half-done registration, best effort, newest first. Deleting the model version also drops any alias
    that pointed at it."""
    c = reg.client
    undo = []
    if "event" in made:
        undo.append(lambda: c.delete_registered_model_tag(name, made["event"]["key"]))
    if "version" in made:
        undo.append(lambda: c.delete_model_version(name, made["version"]))
    if made.get("alias", (None, None))[1]:
        undo.append(lambda: c.set_registered_model_alias(name, made["alias"][0], made["alias"][1]))
    if "logged_model" in made:
        lm = made["logged_model"]

        def drop_model():
            try:
                c.finalize_logged_model(lm.model_id, "FAILED")
            finally:
                c.delete_logged_model(lm.model_id)
            _delete_artifacts(lm.artifact_location)

        undo.append(drop_model)
    if "run" in made:

        def drop_run():
            c.set_tag(made["run"], TAG + "error", "registration failed and was rolled back")
            c.set_terminated(made["run"], "FAILED")
            c.delete_run(made["run"])

        undo.append(drop_run)
    for fn in undo:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - keep undoing the rest
            if is_unreachable(e):
                # the server is gone: each further step would only wait for it again. What is left carries the
                # pending tag; the next registration or promotion of the model removes it (clean_interrupted).
                return


def _finish_run(c, run_id: str) -> None:
    c.set_terminated(run_id, "FINISHED")
    c.delete_tag(run_id, PENDING)


def clean_interrupted(reg: Registry, name: str) -> list[str]:
    """Remove what interrupted registrations of `name` left behind: each version still marked pending (its alias
    moved back, its history event, logged model and run deleted), and pending runs that never got a version. Call
    it holding the model's lock, so no registration of `name` is under way. Returns the versions removed."""
    c = reg.client
    removed, complete_runs = [], set()
    for mv in c.search_model_versions(f"name = '{name}'"):
        if PENDING not in mv.tags:
            complete_runs.add(mv.run_id)
            continue
        _undo_version(reg, name, mv)
        removed.append(str(mv.version))
    exp = c.get_experiment_by_name(reg.settings.experiment)
    if exp is not None:
        for run in c.search_runs([exp.experiment_id], filter_string=f"tags.`{PENDING}` = '{name}'"):
            if run.info.run_id in complete_runs:
                _finish_run(c, run.info.run_id)  # complete, only its last step was cut off
            else:
                _undo_orphan_run(reg, name, exp.experiment_id, run.info.run_id)
    return removed


def _undo_version(reg: Registry, name: str, mv) -> None:
    c = reg.client
    try:
        info = json.loads(mv.tags[PENDING])
    except ValueError:
        info = {}
    made: dict = {"version": str(mv.version), "run": mv.run_id}
    alias = info.get("alias")
    if alias and _alias_version(c, name, alias) == str(mv.version):
        made["alias"] = (alias, info.get("previous"))
    if mv.model_id:
        made["logged_model"] = c.get_logged_model(mv.model_id)
    for key, value in c.get_registered_model(name).tags.items():
        if key.startswith(HISTORY_PREFIX) and _is_register_event(value, str(mv.version)):
            c.delete_registered_model_tag(name, key)
    _rollback(reg, name, made, alias)


def _is_register_event(value: str, version: str) -> bool:
    try:
        event = json.loads(value)
    except ValueError:
        return False
    return event.get("action") == "register" and event.get("to") == version


def _undo_orphan_run(reg: Registry, name: str, experiment_id: str, run_id: str) -> None:
    made: dict = {"run": run_id}
    models = reg.client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
    for lm in models[:1]:  # one registration makes one logged model
        made["logged_model"] = lm
    _rollback(reg, name, made, None)


def _delete_artifacts(location: str) -> None:
    if location.startswith("file:"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        path = Path(url2pathname(urlparse(location).path))
        shutil.rmtree(path, ignore_errors=True)
        if path.name == "artifacts":  # .../models/m-<id>/artifacts: drop the model's folder too if now empty
            try:
                path.parent.rmdir()
            except OSError:
                pass
        return
    try:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        get_artifact_repository(location).delete_artifacts()
    except Exception:  # noqa: BLE001 - not every store can delete
        pass


def register_many(
    reg: Registry,
    generator_dir: str | None,
    probe_dirs: dict[str, str],
    metrics: dict[str, dict] | None = None,
    plots: dict[str, list[str]] | None = None,
    alias: str | None = CHALLENGER,
    coconet_dir: str | None = None,
) -> list[Registered]:
    """The generator first (so probe sets can name its registered version), then each trait's probe set, then
    Coconet. `metrics` / `plots` are keyed by 'generator', a trait, or 'coconet'."""
    metrics, plots = metrics or {}, plots or {}
    out: list[Registered] = []
    if generator_dir:
        out.append(
            register_dir(
                reg,
                generator_dir,
                "generator",
                extra_metrics=metrics.get("generator"),
                plots=plots.get("generator", []),
                alias=alias,
            )
        )
    for trait, directory in sorted(probe_dirs.items()):
        out.append(
            register_dir(
                reg,
                directory,
                "probe_set",
                trait=trait,
                extra_metrics=metrics.get(trait),
                plots=plots.get(trait, []),
                alias=alias,
            )
        )
    if coconet_dir:
        out.append(
            register_dir(
                reg,
                coconet_dir,
                "coconet",
                extra_metrics=metrics.get("coconet"),
                plots=plots.get("coconet", []),
                alias=alias,
            )
        )
    return out


def stage_traits(spec: RegisterParams, params_path: str | Path | None) -> list[str]:
    """The traits the `register` stage registers: `registry.register.traits`, else the keys of `probes.traits`."""
    if spec.traits is not None:
        return list(spec.traits)
    if not params_path or not Path(params_path).is_file():
        return []
    from core.config import load_section
    from models.probe_params import ProbesParams

    return list(load_section(ProbesParams, params_path, "probes").traits)


def stage_inputs(spec: RegisterParams, traits: list[str]) -> dict:
    """What the DVC `register` stage registers, from params.yaml: `registry.register` names the folders and files
    (`{trait}` is replaced per trait) for each of `traits` (see `stage_traits`). Missing optional files (metrics,
    plots) are skipped; a missing generator / probe-set folder is an error."""
    import glob

    out = {"generator": spec.generator, "probes": {}, "metrics": {}, "plots": {}, "coconet": spec.coconet}
    for t in traits:
        if spec.probe_sets:
            out["probes"][t] = spec.probe_sets.format(trait=t)
    for missing in [
        p for p in [out["generator"], *out["probes"].values(), out["coconet"]] if p and not Path(p).exists()
    ]:
        raise RegistryError(f"nothing to register at {missing}: run the stages that make it first (dvc repro)")

    steering = spec.steering_metrics
    for t in traits:
        if steering:
            path = Path(steering.format(trait=t))
            if path.exists():
                data = read_metrics(str(path))
                node = data if "{trait}" in steering else data.get(t, {})
                out["metrics"][t] = {"steering": node} if node else {}
        files = []
        for pattern in spec.plots:
            files += sorted(glob.glob(pattern.format(trait=t)))
        out["plots"][t] = files
    if out["generator"]:
        gm = spec.generator_metrics
        out["metrics"]["generator"] = read_metrics(gm) if gm and Path(gm).exists() else {}
        out["plots"]["generator"] = [p for pattern in spec.generator_plots for p in sorted(glob.glob(pattern))]
    if out["coconet"]:
        cm = spec.coconet_metrics
        out["metrics"]["coconet"] = read_metrics(cm) if cm and Path(cm).exists() else {}
        out["plots"]["coconet"] = [p for pattern in spec.coconet_plots for p in sorted(glob.glob(pattern))]
    return out


def read_metrics(path: str | None) -> dict:
    """The JSON metrics file at `path` ({} when no path is given); RegistryError when it is missing or not JSON."""
    if not path:
        return {}
    p = Path(path)
    if not p.exists():
        raise RegistryError(f"metrics file {p} does not exist")
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise RegistryError(f"metrics file {p} is not JSON ({first_line(e)})") from None
