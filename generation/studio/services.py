"""What the studio's API does, on top of the generation modules, the registry and the data tables. Each job
function takes a `JobContext` (its folder, its parameters, progress/cancel) and returns a JSON-able result; files it
writes land in the job's folder and are served by job id.

Models are loaded once per worker thread and kept: steering installs fused projections on the generator it runs,
so two concurrent generations must not share one generator object.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from core.errors import UserError
from generation.studio.jobs import JobContext

SPECTROGRAM_SR = 16000


class StudioError(UserError):
    """A request the studio cannot serve; the API answers 400 with this one line."""


def check_audio(path: Path, max_seconds: float) -> float:
    """Decode an upload (type told by decoding, not by name); its duration in seconds, or a one-line error."""
    from core.audio import decode_audio

    try:
        wave = decode_audio(str(path), SPECTROGRAM_SR, max_seconds=max_seconds + 1)
    except Exception as e:  # noqa: BLE001 - whatever the decoders raise, the upload is not audio we can read
        raise StudioError(f"the upload is not audio this studio can read ({type(e).__name__})") from None
    if len(wave) < SPECTROGRAM_SR // 10:
        raise StudioError("the uploaded audio is shorter than 0.1 s")
    return len(wave) / SPECTROGRAM_SR


def check_score(path: Path) -> None:
    from core.score_io import ScoreError, read_voices

    try:
        read_voices(str(path))
    except ScoreError as e:
        raise StudioError(str(e).replace(str(path), "the upload")) from None


def spectrogram_png(wav: Path, png: Path, title: str) -> Path:
    import librosa
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from core.audio import decode_audio
    from core.files import atomic_path

    wave = decode_audio(str(wav), SPECTROGRAM_SR)
    mel = librosa.power_to_db(librosa.feature.melspectrogram(y=wave, sr=SPECTROGRAM_SR, n_mels=80), ref=np.max)
    fig, ax = plt.subplots(figsize=(7, 2.6))
    ax.imshow(
        mel,
        origin="lower",
        aspect="auto",
        cmap="magma",
        vmin=-80,
        vmax=0,
        extent=[0, len(wave) / SPECTROGRAM_SR, 0, 80],
    )
    ax.set_xlabel("seconds")
    ax.set_ylabel("mel band")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(str(tmp), format="png", dpi=90)
    plt.close(fig)
    return png


class Services:
    """The studio's work, with per-thread model caches."""

    def __init__(
        self,
        params: str | Path = "params.yaml",
        tracking_uri: str | None = None,
        clips: str = "data/clips",
        scores: str = "data/scores",
        detector: str = "metrics/drum_detector.json",
        max_seconds: float = 30.0,
    ):
        self.params, self.tracking_uri = str(params), tracking_uri
        self.clips, self.scores, self.detector_path = clips, scores, detector
        self.max_seconds = max_seconds
        self._local = threading.local()
        self._aliases_moved = 0  # confirmed promotions: sessions built before one may hold stale aliases
        self._registry = None
        self._registry_lock = threading.Lock()

    # ------------------------------------------------------------------ shared
    @property
    def registry(self):
        with self._registry_lock:
            if self._registry is None:
                from registry.store import Registry, Settings

                self._registry = Registry(
                    Settings.load(self.params if Path(self.params).exists() else None, tracking_uri=self.tracking_uri)
                )
            return self._registry

    def _cached(self, key: tuple, make):
        """This worker thread's session for `key`. Sessions resolve aliases when built, so a promotion (which
        bumps `_aliases_moved`) empties every thread's cache; a few entries per thread bound its memory."""
        local = self._local
        if getattr(local, "epoch", None) != self._aliases_moved or len(getattr(local, "cache", {})) >= 4:
            local.cache, local.epoch = {}, self._aliases_moved
        if key not in local.cache:
            local.cache[key] = make()
        return local.cache[key]

    def generation_session(self, generator: str | None, alias: str):
        from generation.session import GenerationSession

        return self._cached(
            ("gen", generator, alias),
            lambda: GenerationSession(
                generator,
                registry=self.registry,
                params=self.params if Path(self.params).exists() else None,
                alias=alias,
                tracking_uri=self.tracking_uri,
            ),
        )

    def coconet_session(self, model: str | None, alias: str):
        from generation.coconet import CoconetSession

        return self._cached(
            ("coconet", model, alias),
            lambda: CoconetSession(
                model, params=self.params if Path(self.params).exists() else None, registry=self.registry, alias=alias
            ),
        )

    # ------------------------------------------------------------------ steer
    def steer(self, ctx: JobContext) -> dict:
        """One take (or, with compare, the unsteered and the steered take with the same seed)."""
        p = ctx.params
        session = self.generation_session(p.get("generator"), p.get("alias") or "champion")
        prompt = ctx.dir / p["prompt_file"] if p.get("prompt_file") else None
        strengths = {t: float(s) for t, s in (p.get("steer") or {}).items() if float(s) != 0.0}
        takes = [("unsteered", {}), ("steered", strengths)] if p.get("compare") else [("steered", strengths)]
        if not strengths:
            takes = [("unsteered", {})]
        out = {"takes": []}
        for i, (name, steer) in enumerate(takes):

            def progress(done, total, i=i, name=name):
                ctx.progress(i * total + done, len(takes) * total, f"{name}: {done}/{total} frames")

            wav = ctx.dir / f"{name}.wav"
            result = session.generate(
                [p.get("caption") or ""],
                duration=float(p["duration"]),
                continue_from=prompt,
                steer=steer or None,
                mode=p.get("mode", "smitin") if steer else "none",
                out=wav,
                seed=int(p.get("seed", 0)),
                progress=progress,
            )
            take = {
                "name": name,
                "wav": wav.name,
                "steer": steer,
                "spectrogram": spectrogram_png(wav, ctx.dir / f"{name}.png", f"{name} take").name,
            }
            if result.report_json:
                report = json.loads(Path(result.report_json).read_text())
                take["report"] = result.report_json.name
                take["trace"] = _trace(report)
            out["takes"].append(take)
        out["generator"] = session.generator_ref.label()
        out["probe_sets"] = {t: self.probe_heatmap(session, t) for t in strengths}
        return out

    def probe_heatmap(self, session, trait: str) -> dict:
        ps = session.probe_set(trait)
        ref = session.probe_refs[trait]
        return {"label": ref.label(), "accuracy": np.round(ps.accuracy, 4).tolist(), "tau": ps.tau()}

    # ------------------------------------------------------------------ listen
    def listen(self, ctx: JobContext) -> dict:
        """What the generator hears in a clip: each trait's probe reading (teacher-forced, as in training) next to
        the independent detector's judgement."""
        import torch

        from core.audio import decode_audio
        from models.probes import capture_head_outputs

        p = ctx.params
        session = self.generation_session(p.get("generator"), p.get("alias") or "champion")
        gen, codec = session.generator, session.codec
        wave = decode_audio(str(ctx.dir / p["clip_file"]), codec.sample_rate, max_seconds=self.max_seconds)
        traits = list(p.get("traits") or [])
        readings = {}
        for i, trait in enumerate(traits):
            ctx.progress(i, len(traits) + 1, f"probing {trait}")
            ps = session.probe_set(trait)
            window = float(ps.params.get("window_seconds", 4.0))
            codes = torch.as_tensor(codec.encode(wave, codec.sample_rate)).long()
            codes = codes[:, : max(1, int(round(window * codec.frame_rate)))]
            acts = capture_head_outputs(gen, [codes], position=str(ps.params.get("position", "last")))
            prob = ps.probability(acts)[0]  # [L, H]
            top = [prob[layer, h] for layer, h in ps.top_heads(int(ps.params.get("monitor_heads", 16)))]
            readings[trait] = {
                "probability": float(np.median(top)),
                "best_head": float(prob.reshape(-1)[int(np.argmax(ps.accuracy))]),
                "tau": ps.tau(),
                "present": bool(np.median(top) >= ps.tau()),
                "probe_set": session.probe_refs[trait].label(),
            }
        detector = None
        if Path(self.detector_path).is_file() and "drums" in traits:
            from models.detectors import DrumDetector

            det = DrumDetector.load(self.detector_path)
            prob = det.probability(
                decode_audio(str(ctx.dir / p["clip_file"]), 16000, max_seconds=self.max_seconds), 16000
            )
            detector = {"trait": "drums", "probability": prob, "present": prob >= det.threshold}
        ctx.progress(1, 1, "done")
        return {"readings": readings, "detector": detector, "seconds": len(wave) / codec.sample_rate}

    # ------------------------------------------------------------------ harmonize
    def harmonize(self, ctx: JobContext) -> dict:
        p = ctx.params
        session = self.coconet_session(p.get("model"), p.get("alias") or "champion")
        kw = dict(
            sampler=p.get("sampler") or None,
            steps=p.get("steps") or None,
            temperature=p.get("temperature"),
            seed=int(p.get("seed", 0)),
            progress=lambda d, t: ctx.progress(d, t, f"step {d}/{t}"),
            out=ctx.dir / "chorale.mid",
        )
        if p.get("task") == "infill":
            source = ctx.dir / p["score_file"] if p.get("score_file") else self.jsb_piece(int(p.get("chorale", 0)))
            result = session.infill(
                source if isinstance(source, np.ndarray) else str(source),
                bars=str(p["bars"]),
                voices=p.get("voices") or "SATB",
                **kw,
            )
        elif p.get("task") == "compose":
            result = session.compose(bars=int(p.get("bars") or 8), **kw)
        else:
            if p.get("melody_file"):
                melody = str(ctx.dir / p["melody_file"])
            else:
                melody = self.jsb_piece(int(p.get("chorale", 0)))[0]
            result = session.harmonize(melody, voices=p.get("voices") or "ATB", **kw)
        return {
            "roll": result.roll.tolist(),
            "given": result.given.astype(int).tolist(),
            "info": result.info,
            "files": {k: Path(v).name for k, v in result.files.items()},
        }

    def jsb_piece(self, index: int) -> np.ndarray:
        """A held-out (test split) JSB chorale, first 8 bars."""
        from core.scores_table import read_scores

        try:
            _, rolls = read_scores(self.scores, "test")
        except UserError as e:
            raise StudioError(str(e)) from None
        if not 0 <= index < len(rolls):
            raise StudioError(f"chorale {index} does not exist (0..{len(rolls) - 1})")
        return rolls[index][:, :128]

    # ------------------------------------------------------------------ data
    def clips_page(
        self,
        split: str | None,
        q: str | None,
        trait: str | None,
        min_bpm: float | None,
        max_bpm: float | None,
        key: str | None,
        offset: int,
        limit: int,
    ) -> dict:
        import pyarrow.compute as pc

        from core.clips_table import ClipsTableError, read_clips_table, traits_dict

        cols = [
            "clip_id",
            "source_path",
            "split",
            "start_s",
            "duration_s",
            "tempo_bpm",
            "key",
            "mode",
            "time_signature",
            "chords",
            "traits",
            "caption",
            "loudness_lufs",
        ]
        try:
            table = read_clips_table(self.clips, columns=cols)
        except ClipsTableError as e:
            raise StudioError(str(e)) from None
        mask = None

        def both(m):
            return m if mask is None else pc.and_(mask, m)

        if split:
            mask = both(pc.equal(table["split"], split))
        if q:
            mask = both(pc.match_substring(pc.utf8_lower(table["caption"]), q.lower()))
        if min_bpm is not None:
            mask = both(pc.greater_equal(table["tempo_bpm"], min_bpm))
        if max_bpm is not None:
            mask = both(pc.less_equal(table["tempo_bpm"], max_bpm))
        if key:
            mask = both(pc.equal(table["key"], key))
        if mask is not None:
            table = table.filter(pc.fill_null(mask, False))
        rows = table.to_pylist()
        if trait:
            rows = [r for r in rows if traits_dict(r["traits"]).get(trait)]
        page = rows[offset : offset + limit]
        for r in page:
            r["traits"] = traits_dict(r["traits"])
            r["chords"] = [c["label"] for c in (r["chords"] or [])][:24]
        return {"total": len(rows), "offset": offset, "rows": page}

    def clip_audio(self, clip_id: str) -> bytes:
        import pyarrow.compute as pc

        from core.clips_table import read_clips_table

        table = read_clips_table(self.clips, columns=["clip_id", "audio"])
        hit = table.filter(pc.equal(table["clip_id"], clip_id))
        if hit.num_rows == 0:
            raise KeyError(clip_id)
        return hit["audio"][0].as_py()["bytes"]

    # ------------------------------------------------------------------ registry
    def registry_overview(self) -> dict:
        from registry.promotion import version_metrics
        from registry.store import TAG, translate_errors

        reg = self.registry
        reg.check()
        out = []
        with translate_errors(reg):
            for rm in reg.registered_models(max_results=200):  # without the promotion locks
                # a version's aliases come from its model: search_model_versions does not fill them in
                aliases = {a: str(v) for a, v in (rm.aliases or {}).items()}
                versions = []
                found = reg.client.search_model_versions(f"name = '{rm.name}'")
                for mv in sorted(found, key=lambda v: -int(v.version)):
                    metrics = version_metrics(mv)
                    versions.append(
                        {
                            "version": str(mv.version),
                            "aliases": sorted(a for a, v in aliases.items() if v == str(mv.version)),
                            "metrics": {k: v for k, v in metrics.items() if k in KEY_METRICS},
                            "lineage": {
                                k[len(TAG) :]: v
                                for k, v in mv.tags.items()
                                if k
                                in (
                                    TAG + "git_commit",
                                    TAG + "data_hash",
                                    TAG + "generator_version",
                                    TAG + "fingerprint",
                                )
                            },
                            "created": mv.creation_timestamp,
                        }
                    )
                out.append({"name": rm.name, "aliases": aliases, "versions": versions[:20]})
        return {"tracking_uri": reg.uri, "models": sorted(out, key=lambda m: m["name"])}

    def promote(self, model: str, version: str | None, confirm: bool, reason: str = "") -> dict:
        from registry.errors import PromotionRefused
        from registry.promotion import promote

        try:
            result = promote(self.registry, model, version, reason=reason or "studio", dry_run=not confirm)
        except PromotionRefused as e:
            return {"promoted": False, "refused": str(e)}
        if result.promoted:
            self._aliases_moved += 1
        return {
            "promoted": result.promoted,
            "name": result.name,
            "version": result.version,
            "previous": result.previous,
            "gates": [{"name": g.name, "passed": g.passed, "detail": g.detail} for g in result.gates],
        }


KEY_METRICS = (
    "best_acc",
    "top16_acc",
    "mean_acc",
    "valid_loss",
    "nll.frame.nll",
    "steering.continuation.add.smitin.success",
    "steering.text.add.smitin.success",
)


def _trace(report: dict) -> dict:
    """Per trait: the monitored probability and the push per step, the stop threshold (what the page draws)."""
    plan = report["plan"]
    out = {}
    for trait, strength in plan["strengths"].items():
        steps = report["steps"]
        tau = plan["tau"][trait]
        out[trait] = {
            "strength": strength,
            "tau": tau if strength > 0 else 1.0 - tau,
            "probability": [s["traits"][trait]["probability"][0] for s in steps],
            "push": [s["traits"][trait]["push"][0] for s in steps],
            "on": [bool(s["traits"][trait]["on"][0]) for s in steps],
        }
    return out
