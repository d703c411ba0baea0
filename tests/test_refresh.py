"""`smitin refresh`'s promotion step: the generator first, then each trait's probe set through the gates; a refused
challenger stays a challenger (the champion is kept, nothing raises); a MusicGen setup promotes its
smitin-probes-musicgen-TRAIT sets and no generator. (The dvc repro half runs in tests/test_pipeline_e2e.py.)"""

from __future__ import annotations

import shutil

import pytest
import yaml

from registry.refresh import promote_challengers
from registry.registration import register_dir
from registry.store import Registry, Settings
from tests.conftest_registry import make_generator_dir, make_probe_set_dir

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def project(tmp_path, mlflow_template_db, monkeypatch):  # noqa: F811
    """A params.yaml whose registry is a private copy of the migrated SQLite template."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copy(mlflow_template_db, tmp_path / "mlflow.db")
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "probes": {"traits": {"drums": {}, "piano": {}}},
                "registry": {
                    "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                    "artifact_root": str(tmp_path / "art"),
                    "cache_dir": str(tmp_path / "cache"),
                    "gates": {"tolerance": 0.01, "probe_set": {"best_acc": "higher"}},
                },
            }
        )
    )
    return params, Registry(Settings.load(params))


def test_refused_challenger_keeps_the_champion_and_the_rest_still_promote(project, tmp_path):
    params, reg = project
    fp = make_generator_dir(tmp_path / "generator", seed=1)
    register_dir(reg, tmp_path / "generator")
    register_dir(reg, make_probe_set_dir(tmp_path / "drums-v1", "drums", fp, best_acc=0.90, seed=1))
    lines: list[str] = []
    promoted, kept = promote_challengers(params, log=lines.append)
    assert promoted == {"smitin-generator": "1", "smitin-probes-drums": "1"}
    assert kept == {"smitin-probes-piano": "nothing registered yet"}

    # a worse drums probe set becomes the challenger: refused, v1 stays champion; a new piano set is promoted
    register_dir(reg, make_probe_set_dir(tmp_path / "drums-v2", "drums", fp, best_acc=0.70, seed=2))
    register_dir(reg, make_probe_set_dir(tmp_path / "piano-v1", "piano", fp, best_acc=0.80, seed=3))
    lines.clear()
    promoted, kept = promote_challengers(params, log=lines.append)
    assert promoted == {"smitin-probes-piano": "1"}
    assert "best_acc" in kept["smitin-probes-drums"]
    assert "smitin-generator: v1 is already the champion" in lines
    assert any(line.startswith("smitin-probes-drums: challenger kept, champion unchanged") for line in lines)
    champion = reg.client.get_model_version_by_alias("smitin-probes-drums", "champion")
    assert str(champion.version) == "1"


def test_musicgen_setup_promotes_its_probe_sets_and_no_generator(project, tmp_path):
    params, reg = project
    settings = yaml.safe_load(params.read_text())
    settings["generator"] = {"backend": "musicgen", "path": str(tmp_path / "musicgen")}
    settings["probes"]["traits"] = {"drums": {}}
    params.write_text(yaml.safe_dump(settings))
    lines: list[str] = []
    promoted, kept = promote_challengers(params, log=lines.append)
    assert promoted == {} and kept == {"smitin-probes-musicgen-drums": "nothing registered yet"}
    assert not any("smitin-generator" in line for line in lines)
