"""An independent drum detector and the trait-carrying evaluation of the generator.

The detector never looks at the generator: it is a logistic regression on audio descriptors that a drum kit moves
and a chorale does not (percussive/harmonic energy ratio from HPSS, spectral flatness, onset strength statistics,
high-band and low-band flux, onset periodicity), fitted on clips with known `drums` traits *after a codec round
trip* (encode, decode), so it judges audio of the kind the generator's output will be. Descriptors are order
statistics over the segment, so irregular hits count as well as a steady groove. Stored as JSON (no pickles).

Trait carrying: prompts of held-out clips with / without drums are continued by the generator; the detector
judges the decoded continuation (prompt excluded). As a reference it also judges the codec-decoded *real*
continuation of the same prompts.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

FEATURES = ["perc_ratio", "perc_ratio_p90", "flatness_mean", "flatness_p90", "onset_mean", "onset_p90",
            "onset_peakiness", "hi_flux_mean", "hi_flux_p90", "hi_ratio", "lo_flux_p90", "periodicity"]


def drum_descriptors(wave: np.ndarray, sr: int) -> np.ndarray:
    """Descriptor vector (see FEATURES) of a mono wave."""
    import librosa

    wave = np.asarray(wave, np.float32)
    if len(wave) < 2048:
        wave = np.pad(wave, (0, 2048 - len(wave)))
    wave = wave / (np.abs(wave).max() + 1e-6)
    hop = 256
    S = np.abs(librosa.stft(wave, n_fft=1024, hop_length=hop))
    H, P = librosa.decompose.hpss(S, margin=1.0)
    he, pe = (H ** 2).sum(0), (P ** 2).sum(0)
    ratio = pe / (he + pe + 1e-9)
    flat = librosa.feature.spectral_flatness(S=S)[0]
    freqs = librosa.fft_frequencies(sr=sr, n_fft=1024)
    logS = np.log1p(100 * S)
    flux = np.maximum(0, np.diff(logS, axis=1))
    hi = freqs >= 3000
    lo = freqs <= 150
    hi_flux = flux[hi].mean(0)
    lo_flux = flux[lo].mean(0)
    onset = flux.mean(0)
    hi_ratio = (S[hi] ** 2).sum() / ((S ** 2).sum() + 1e-9)
    # periodicity: highest normalised autocorrelation of the onset envelope between 0.2 s and 1.5 s lags
    o = onset - onset.mean()
    ac = np.correlate(o, o, mode="full")[len(o) - 1:]
    ac = ac / (ac[0] + 1e-9)
    lo_lag, hi_lag = int(0.2 * sr / hop), min(int(1.5 * sr / hop), len(ac) - 1)
    periodicity = float(ac[lo_lag:hi_lag].max()) if hi_lag > lo_lag else 0.0
    return np.array([
        ratio.mean(), np.percentile(ratio, 90), np.log(flat.mean() + 1e-9), np.log(np.percentile(flat, 90) + 1e-9),
        onset.mean(), np.percentile(onset, 90), np.percentile(onset, 95) / (np.median(onset) + 1e-6),
        hi_flux.mean(), np.percentile(hi_flux, 90), np.log(hi_ratio + 1e-9), np.percentile(lo_flux, 90), periodicity,
    ], dtype=np.float64)


class DrumDetector:
    """Standardise descriptors, then logistic regression; `probability(wave, sr)` in [0, 1]."""

    def __init__(self, mean, scale, coef, intercept, threshold: float = 0.5, info: dict | None = None):
        self.mean, self.scale = np.asarray(mean), np.asarray(scale)
        self.coef, self.intercept = np.asarray(coef), float(intercept)
        self.threshold = threshold
        self.info = info or {}

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, C: float = 1.0) -> "DrumDetector":
        from sklearn.linear_model import LogisticRegression

        mean, scale = X.mean(0), X.std(0) + 1e-9
        clf = LogisticRegression(C=C, max_iter=2000).fit((X - mean) / scale, y)
        return cls(mean, scale, clf.coef_[0], clf.intercept_[0])

    def probability_of(self, X: np.ndarray) -> np.ndarray:
        z = ((np.atleast_2d(X) - self.mean) / self.scale) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def probability(self, wave: np.ndarray, sr: int) -> float:
        return float(self.probability_of(drum_descriptors(wave, sr))[0])

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"features": FEATURES, "mean": self.mean.tolist(),
                                          "scale": self.scale.tolist(), "coef": self.coef.tolist(),
                                          "intercept": self.intercept, "threshold": self.threshold,
                                          "info": self.info}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "DrumDetector":
        d = json.loads(Path(path).read_text())
        return cls(d["mean"], d["scale"], d["coef"], d["intercept"], d["threshold"], d.get("info"))


def _segments(tokens, codec, n_frames: int, per_clip: int, gen: np.random.Generator):
    """(codes segment [K, n_frames], drums label, clip index) from a TokenSet, random starts."""
    out = []
    for i in range(len(tokens)):
        trait = tokens.meta["traits"][i].get("drums")
        if trait is None:
            continue
        c = tokens.clip(i)
        if c.shape[1] < n_frames:
            continue
        for _ in range(per_clip):
            s = int(gen.integers(0, c.shape[1] - n_frames + 1))
            out.append((c[:, s:s + n_frames], bool(trait), i))
    return out


_PARALLEL_MIN_SEGMENTS = 16  # below this a thread pool saves nothing


def _descriptors_of_decoded(codec, segments: list) -> np.ndarray:
    """drum_descriptors of each decoded segment. Descriptors (FFTs, HPSS median filters: numpy and scipy release
    the GIL) run in two threads while this thread decodes the next segments: 1.8x faster on 2 cores, where the
    detector fit of evaluate_steering took ~150 s one segment at a time. Same values either way (tested)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    workers = min(2, os.cpu_count() or 1)
    waves = (codec.decode(c) for c in segments)
    if workers < 2 or len(segments) < _PARALLEL_MIN_SEGMENTS:
        return np.stack([drum_descriptors(w, codec.sample_rate) for w in waves])
    with ThreadPoolExecutor(workers) as pool:
        return np.stack(list(pool.map(lambda w: drum_descriptors(w, codec.sample_rate), waves)))


def fit_drum_detector(tokens_dir, codec, seconds: float, per_clip: int = 2, max_clips: int = 400,
                      seed: int = 0) -> DrumDetector:
    """Fit on codec-decoded segments of the train split, report accuracy on the test split's decoded segments.
    `tokens_dir`: a token folder, or {"train": tokens, "test": tokens} already in memory (same interface)."""
    from models.train import TokenSet

    gen = np.random.default_rng(seed)
    n = int(round(seconds * codec.frame_rate))
    result = {}
    data = {}
    for split in ("train", "test"):
        ts = tokens_dir[split] if isinstance(tokens_dir, dict) else TokenSet(tokens_dir, split)
        segs = _segments(ts, codec, n, per_clip, gen)
        if len(segs) > max_clips:
            segs = [segs[j] for j in gen.permutation(len(segs))[:max_clips]]
        X = _descriptors_of_decoded(codec, [c for c, _, _ in segs])
        y = np.array([lab for _, lab, _ in segs], dtype=int)
        data[split] = (X, y)
    if len(set(data["train"][1])) < 2:
        from pipelines.errors import UserError

        raise UserError("the train split needs clips with and without drums to fit the drum detector")
    det = DrumDetector.fit(*data["train"])
    for split, (X, y) in data.items():
        result[f"{split}_accuracy_decoded"] = float(((det.probability_of(X) >= 0.5) == y).mean())
        result[f"{split}_n"] = int(len(y))
    det.info = {"seconds": seconds, "codec": codec.fingerprint(), **result}
    return det


def evaluate_trait_carrying(generator_dir: str, tokens_dir: str, clips_dir: str | None, params: dict,
                            out_path: str | None = None, samples_dir: str | None = None,
                            detector_path: str | None = None) -> dict:
    """Continue held-out drum / drum-free prompts and judge the continuations with the independent detector."""
    import soundfile as sf

    from models.generator import load_generator, sampling_temperature
    from models.train import TokenSet

    seed = int(params.get("seed", 0))
    torch.manual_seed(seed)
    generator, codec = load_generator(generator_dir)
    prompt_n = int(round(float(params.get("prompt_seconds", 2.0)) * codec.frame_rate))
    new_n = int(round(float(params.get("continuation_seconds", 3.0)) * codec.frame_rate))
    t0 = time.time()
    det = None
    if detector_path and Path(detector_path).exists():  # reuse a detector fitted for this codec and length
        det = DrumDetector.load(detector_path)
        if det.info.get("codec") != codec.fingerprint() or det.info.get("seconds") != new_n / codec.frame_rate:
            det = None
    if det is None:
        det = fit_drum_detector(tokens_dir, codec, new_n / codec.frame_rate, seed=seed,
                                max_clips=int(params.get("detector_max_segments", 400)))
    log.info("drum detector: %s (%.0fs)", det.info, time.time() - t0)
    test = TokenSet(tokens_dir, params.get("split", "test"))
    gen = np.random.default_rng(seed)
    per_class = int(params.get("prompts_per_class", 24))
    picked = {True: [], False: []}
    for i in gen.permutation(len(test)):
        lab = test.meta["traits"][int(i)].get("drums")
        c = test.clip(int(i))
        if lab is None or c.shape[1] < prompt_n + new_n or len(picked[bool(lab)]) >= per_class:
            continue
        picked[bool(lab)].append(int(i))
    results = {}
    for mode in params.get("modes", ["unconditional"]):
        rows = []
        for lab, idx in picked.items():
            if not idx:
                continue
            prompts = torch.stack([test.clip(i)[:, :prompt_n] for i in idx])
            real = [test.clip(i)[:, prompt_n:prompt_n + new_n] for i in idx]
            cond = test.condition[torch.tensor(idx)] if mode == "caption" else None
            attrs = test.attributes[torch.tensor(idx)] if mode == "caption" else None
            out = generator.generate(new_n, prompt=prompts, condition=cond, attributes=attrs,
                                     temperature=sampling_temperature(params.get("temperature", 1.0)),
                                     top_k=int(params.get("top_k", 0)), top_p=float(params.get("top_p", 0.0)),
                                     cfg_scale=float(params.get("cfg_scale", 3.0)) if mode == "caption" else 1.0,
                                     seed=seed)
            for j, i in enumerate(idx):
                cont = codec.decode(out[j, :, prompt_n:])
                p_gen = det.probability(cont, codec.sample_rate)
                p_real = det.probability(codec.decode(real[j]), codec.sample_rate)
                rows.append({"clip": test.meta["clip_id"][i], "drums": lab, "p_generated": p_gen, "p_real": p_real})
                if samples_dir and j < int(params.get("samples_per_class", 2)):
                    Path(samples_dir).mkdir(parents=True, exist_ok=True)
                    full = codec.decode(out[j])
                    name = f"{mode}_{'drums' if lab else 'nodrums'}_{j}.wav"
                    sf.write(str(Path(samples_dir) / name), full, codec.sample_rate)
        summary = {}
        for lab, key in ((True, "drum_prompts"), (False, "drumfree_prompts")):
            sel = [r for r in rows if r["drums"] == lab]
            if sel:
                summary[key] = {
                    "n": len(sel),
                    "judged_drums_generated": float(np.mean([r["p_generated"] >= det.threshold for r in sel])),
                    "judged_drums_real_continuation": float(np.mean([r["p_real"] >= det.threshold for r in sel])),
                    "mean_p_generated": float(np.mean([r["p_generated"] for r in sel])),
                    "mean_p_real": float(np.mean([r["p_real"] for r in sel])),
                }
        results[mode] = {"summary": summary, "rows": rows}
    report = {"detector": det.info, "prompt_frames": prompt_n, "continuation_frames": new_n,
              "generator_fingerprint": generator.fingerprint(),
              "summary": {"detector": det.info, **{m: r["summary"] for m, r in results.items()}},
              "results": results}
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(report, indent=1))
        det.save(Path(out_path).with_name("drum_detector.json"))
    return report
