"""`smitin refresh`: the scheduled job. `dvc repro` (DVC re-runs only the stages whose inputs changed: no new
audio means no training), then offer each newly registered challenger for promotion through the gates.

The generator goes first: a probe set is only promotable once the generator it was trained on is the champion
(the `compatible` gate), so a generator that fails its gates keeps its probe sets from being promoted too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError


@dataclass
class RefreshResult:
    stages_run: list[str] = field(default_factory=list)
    promoted: dict[str, str] = field(default_factory=dict)  # model -> version now champion
    kept: dict[str, str] = field(default_factory=dict)  # model -> why its challenger was not promoted


def _lock_entries(lock: Path) -> dict:
    if not lock.exists():
        return {}
    import yaml

    return (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}


def _dvc() -> str:
    here = Path(sys.executable).parent / "dvc"  # the venv's dvc, even when the venv is not activated
    found = str(here) if here.exists() else shutil.which("dvc")
    if not found:
        raise UserError("dvc is not installed in this environment (run `make setup`)")
    return found


def venv_env() -> dict[str, str]:
    """The environment with this interpreter's bin folder first on PATH: the stage commands of dvc.yaml call
    `smitin`, which must be this venv's even when it is not activated (`.venv/bin/smitin refresh` from cron)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}


def run_repro(project: Path, dvc_args: list[str]) -> list[str]:
    """`dvc repro` in `project` with its output on the user's screen; returns the stages that ran (changed lock)."""
    if not (project / "dvc.yaml").exists():
        raise UserError(f"{project} has no dvc.yaml: run smitin refresh in the project folder (or give --project)")
    lock = project / "dvc.lock"
    before = _lock_entries(lock)
    rc = subprocess.call([_dvc(), "repro", *dvc_args], cwd=project, env=venv_env())
    if rc:
        raise UserError(f"dvc repro failed (exit {rc}); the stage output above says why")
    after = _lock_entries(lock)
    return [name for name, entry in after.items() if before.get(name) != entry]


def promote_challengers(params: Path, tracking_uri: str | None = None, log=print) -> tuple[dict, dict]:
    """Promote the generator's, then each trait's challenger through the gates. Refusals are kept, not raised."""
    from core.config import load_section
    from models.generation_params import GeneratorParams
    from registry.errors import ModelNotFound, PromotionRefused
    from registry.promotion import alias_version, promote
    from registry.registration import stage_traits
    from registry.store import CHALLENGER, Registry, Settings

    reg = Registry(Settings.load(params, tracking_uri=tracking_uri))
    traits = stage_traits(reg.settings.register, params)
    backend = load_section(GeneratorParams, params, "generator").backend if params.is_file() else "builtin"
    # MusicGen weights are referenced, not registered: only their probe sets (smitin-probes-musicgen-TRAIT) promote
    models = [] if backend == "musicgen" else [reg.settings.generator_name]
    models += [reg.model_name("probe_set", t, backend=backend) for t in traits]
    if reg.settings.register.coconet:
        models.append(reg.settings.coconet_name)
    promoted, kept = {}, {}
    for model in models:
        reg.check()
        if (
            not reg.client.search_registered_models(f"name = '{model}'")
            or alias_version(reg.client, model, CHALLENGER) is None
        ):
            kept[model] = "nothing registered yet"
            log(f"{model}: nothing registered yet")
            continue
        try:
            result = promote(reg, model, reason="smitin refresh")
        except PromotionRefused as e:
            kept[model] = str(e)
            log(f"{model}: challenger kept, champion unchanged: {e}")
            continue
        except ModelNotFound as e:
            kept[model] = str(e)
            log(f"{model}: {e}")
            continue
        if result.promoted:
            promoted[model] = result.version
            log(f"{model}: champion {('v' + result.previous) if result.previous else 'none'} -> v{result.version}")
        else:
            log(f"{model}: v{result.version} is already the champion")
    return promoted, kept


def refresh(
    project: Path = Path("."),
    params: Path | None = None,
    *,
    dvc_args: list[str] | None = None,
    promote: bool = True,
    tracking_uri: str | None = None,
    log=print,
) -> RefreshResult:
    project = Path(project)
    params = Path(params) if params else project / "params.yaml"
    result = RefreshResult()
    result.stages_run = run_repro(project, list(dvc_args or []))
    trained = [s for s in result.stages_run if s.startswith(("train_generator", "train_probes"))]
    log(
        f"stages run: {', '.join(result.stages_run) or 'none (everything up to date)'}; "
        f"{'trained: ' + ', '.join(trained) if trained else 'no training'}"
    )
    if promote:
        result.promoted, result.kept = promote_challengers(params, tracking_uri=tracking_uri, log=log)
    return result
