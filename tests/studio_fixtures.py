"""A studio over real (debug-sized) models served by a real registry: a generator with its codec and a drums probe
set, a Coconet, a small clips table, the JSB scores table and a drum detector; all registered and promoted to
champion in an SQLite registry. Used by the API, browser and load tests."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class StudioEnv:
    root: Path
    params_path: Path
    tracking_uri: str
    clip_wav: Path
    melody_mid: Path


def build_env(root: Path, template_db: Path) -> StudioEnv:
    from core.score_io import write_midi
    from models.detectors import FEATURES, DrumDetector
    from pipelines.scores import BuildScoresParams, build_scores
    from registry.promotion import promote
    from registry.registration import register_dir
    from registry.store import Registry, Settings
    from tests.clips_fixtures import write_clips_table
    from tests.model_fixtures import debug_models

    root.mkdir(parents=True, exist_ok=True)
    dirs = debug_models(root / "models")
    db = root / "mlflow.db"
    shutil.copy(template_db, db)
    uri = f"sqlite:///{db}"
    params = {
        "seed": 0,
        "registry": {"artifact_root": str(root / "mlartifacts"), "cache_dir": str(root / "cache")},
        "generate": {"steering": {"every": 1, "decay": 0.5, "tau": None, "monitor_heads": 4, "iti_top_k": 4}},
        "studio": {
            "results_dir": str(root / "jobs"),
            "clips": str(root / "clips"),
            "scores": str(root / "scores"),
            "detector": str(root / "detector.json"),
            "max_duration_s": 2.0,
            "workers": 2,
            "max_waiting": 2,
        },
    }
    params_path = root / "params.yaml"
    import yaml

    params_path.write_text(yaml.safe_dump(params))
    reg = Registry(Settings.load(params_path, tracking_uri=uri))
    register_dir(reg, dirs["generator"], "generator")
    register_dir(reg, dirs["probes"], "probe_set", trait="drums")
    register_dir(
        reg, dirs["coconet"], "coconet", extra_metrics={"nll": {"frame": {"nll": 3.0, "ensemble": 1, "pieces": 2}}}
    )
    for model in ("generator", "drums", "coconet"):
        promote(reg, model)
    write_clips_table(root / "clips", n_per_split=(4, 2, 2))
    build_scores(
        [str(ROOT / "pipelines" / "data" / "jsb" / "Jsb16thSeparated.json.gz")],
        str(root / "scores"),
        BuildScoresParams(),
    )
    rng = np.random.default_rng(0)
    k = len(FEATURES)
    DrumDetector(rng.standard_normal(k), np.ones(k), rng.standard_normal(k), 0.0).save(root / "detector.json")
    wave = 0.3 * np.sin(2 * np.pi * 220 * np.arange(16000 * 2) / 16000).astype(np.float32)
    sf.write(root / "clip.wav", wave, 16000)
    melody = np.array([72] * 8 + [74] * 8 + [76] * 8 + [72] * 8)
    write_midi(melody[None], root / "melody.mid")
    return StudioEnv(root, params_path, uri, root / "clip.wav", root / "melody.mid")


def make_app(env: StudioEnv, token: str | None = None, **overrides):
    from core.config import load_section
    from generation.studio.app import StudioParams, create_app

    p = load_section(StudioParams, env.params_path, "studio")
    if overrides:
        p = p.with_overrides(overrides, "test")
    return create_app(p, params_path=str(env.params_path), tracking_uri=env.tracking_uri, token=token)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving an app on a free loopback port, in a thread; `url` once it answers."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        import urllib.request

        self.thread.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/api/health", timeout=1) as r:
                    if json.loads(r.read())["status"] == "ok":
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the studio server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
