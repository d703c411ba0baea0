"""An independent drum detector and the trait-carrying evaluation of the generator.

The detector never looks at the generator: it is a logistic regression on audio descriptors that a drum kit moves
and a chorale does not (percussive/harmonic energy ratio from HPSS, spectral flatness, onset strength statistics,
high-band and low-band flux, onset periodicity), fitted on clips with known `drums` traits *after a codec round
trip* (encode, decode), so it judges audio of the kind the generator's output will be. Descriptors are order
statistics over the segment, so irregular hits count as well as a steady groove. Stored as JSON (no pickles).

Generated tokens are not clean codec tokens: a sampled token now and then is one real audio would not have, and
its decoded frame is a click. Fitted on clean decoded audio alone, the detector read such clicks as drums: with 6%
of a drum-free segment's tokens replaced by random ones it called 36% of them drum-bearing (10% when clean), so it
judged the generator's glitches, not its drums. The detector is therefore also fitted on copies of its training
segments with `token_noise` of their tokens replaced by draws from the codebooks' token frequencies (both classes
alike, labels unchanged: noise is not a trait), and it reports its accuracy on clean and on noisy test segments.
The noise never comes from the generator, so the detector stays independent of it.

Trait carrying: prompts of held-out clips with / without drums are continued by the generator; the detector
judges the decoded continuation (prompt excluded). As a reference it also judges the codec-decoded *real*
continuation of the same prompts.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from models.carrying import EvaluateCarryingParams

log = logging.getLogger(__name__)

FEATURES = [
    "perc_ratio",
    "perc_ratio_p90",
    "flatness_mean",
    "flatness_p90",
    "onset_mean",
    "onset_p90",
    "onset_peakiness",
    "hi_flux_mean",
    "hi_flux_p90",
    "hi_ratio",
    "lo_flux_p90",
    "periodicity",
]


def spectral_parts(wave: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(S, H, P): the magnitude STFT of the peak-normalised wave and its harmonic / percussive parts (HPSS), the
    costly half of `drum_descriptors`, shared with the strength judge (models.drum_strength)."""
    import librosa

    wave = np.asarray(wave, np.float32)
    if len(wave) < 2048:
        wave = np.pad(wave, (0, 2048 - len(wave)))
    wave = wave / (np.abs(wave).max() + 1e-6)
    S = np.abs(librosa.stft(wave, n_fft=1024, hop_length=256))
    return (S, *hpss(S))


_HPSS_KERNEL = 31  # librosa.decompose.hpss' default median length, in frames (harmonic) and bins (percussive)


def hpss(S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`librosa.decompose.hpss(S, margin=1.0)` for a real magnitude spectrogram [bins, frames], the same values
    (tested), about 1.6 times as fast (benchmarks/hpss.py): the two median filters run as a partition over strided
    windows of a contiguous copy instead of scipy.ndimage's per-pixel filter, most of a detector fit's time."""
    import librosa

    harm = _running_median(S, _HPSS_KERNEL)  # along time
    perc = _running_median(np.ascontiguousarray(S.T), _HPSS_KERNEL).T  # along frequency
    mask_harm = librosa.util.softmask(harm, perc, power=2.0, split_zeros=True)
    mask_perc = librosa.util.softmask(perc, harm, power=2.0, split_zeros=True)
    return S * mask_harm, S * mask_perc


def _running_median(x: np.ndarray, k: int) -> np.ndarray:
    """Median of each length-`k` (odd) window along the last axis of a 2-D array, centred, edges mirrored as
    scipy.ndimage's mode="reflect" (numpy's "symmetric")."""
    from numpy.lib.stride_tricks import sliding_window_view

    padded = np.pad(x, [(0, 0), (k // 2, k // 2)], mode="symmetric")
    return np.partition(sliding_window_view(padded, k, axis=-1), k // 2, axis=-1)[..., k // 2]


def drum_descriptors(wave: np.ndarray, sr: int, parts: tuple | None = None) -> np.ndarray:
    """Descriptor vector (see FEATURES) of a mono wave (`parts`: its `spectral_parts`, when already computed)."""
    import librosa

    hop = 256
    S, H, P = parts if parts is not None else spectral_parts(wave)
    he, pe = (H**2).sum(0), (P**2).sum(0)
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
    hi_ratio = (S[hi] ** 2).sum() / ((S**2).sum() + 1e-9)
    # periodicity: highest normalised autocorrelation of the onset envelope between 0.2 s and 1.5 s lags
    o = onset - onset.mean()
    ac = np.correlate(o, o, mode="full")[len(o) - 1 :]
    ac = ac / (ac[0] + 1e-9)
    lo_lag, hi_lag = int(0.2 * sr / hop), min(int(1.5 * sr / hop), len(ac) - 1)
    periodicity = float(ac[lo_lag:hi_lag].max()) if hi_lag > lo_lag else 0.0
    return np.array(
        [
            ratio.mean(),
            np.percentile(ratio, 90),
            np.log(flat.mean() + 1e-9),
            np.log(np.percentile(flat, 90) + 1e-9),
            onset.mean(),
            np.percentile(onset, 90),
            np.percentile(onset, 95) / (np.median(onset) + 1e-6),
            hi_flux.mean(),
            np.percentile(hi_flux, 90),
            np.log(hi_ratio + 1e-9),
            np.percentile(lo_flux, 90),
            periodicity,
        ],
        dtype=np.float64,
    )


class DrumDetector:
    """Standardise descriptors, then logistic regression; `probability(wave, sr)` in [0, 1]."""

    def __init__(self, mean, scale, coef, intercept, threshold: float = 0.5, info: dict | None = None):
        self.mean, self.scale = np.asarray(mean), np.asarray(scale)
        self.coef, self.intercept = np.asarray(coef), float(intercept)
        self.threshold = threshold
        self.info = info or {}

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, C: float = 1.0) -> DrumDetector:
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
        Path(path).write_text(
            json.dumps(
                {
                    "features": FEATURES,
                    "mean": self.mean.tolist(),
                    "scale": self.scale.tolist(),
                    "coef": self.coef.tolist(),
                    "intercept": self.intercept,
                    "threshold": self.threshold,
                    "info": self.info,
                },
                indent=1,
            )
        )

    @classmethod
    def load(cls, path: str | Path) -> DrumDetector:
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
            out.append((c[:, s : s + n_frames], bool(trait), i))
    return out


_PARALLEL_MIN_SEGMENTS = 16  # below this a thread pool saves nothing


def _descriptors_of_decoded(codec, segments: list) -> np.ndarray:
    """drum_descriptors of each decoded segment, decoded and described in two threads (the decoder's torch ops,
    FFTs and HPSS median filters release the GIL). Decoding used to be most of the cost (0.11 s of a 2 s segment by
    Griffin-Lim) and ran in this thread alone while only the descriptors ran in the pool. Same values either way
    (tested)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    workers = min(2, os.cpu_count() or 1)
    if workers < 2 or len(segments) < _PARALLEL_MIN_SEGMENTS:
        return np.stack([drum_descriptors(codec.decode(c), codec.sample_rate) for c in segments])
    with ThreadPoolExecutor(workers) as pool:
        return np.stack(list(pool.map(lambda c: drum_descriptors(codec.decode(c), codec.sample_rate), segments)))


def token_frequencies(segments: list, card: int) -> torch.Tensor:
    """[K, card] token counts of each codebook over `segments` (+1 smoothing): what token noise is drawn from."""
    codes = torch.cat([c for c in segments], dim=1).long()
    return torch.stack([torch.bincount(row, minlength=card)[:card] for row in codes]).float() + 1.0


def add_token_noise(codes: torch.Tensor, rate: float, frequencies: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A copy of `codes` [K, T] with each token replaced, with probability `rate`, by a draw from its codebook's
    token frequencies (independently per codebook and frame)."""
    out = codes.clone()
    for k in range(out.shape[0]):
        hit = torch.rand(out.shape[1], generator=gen) < rate
        if int(hit.sum()):
            out[k, hit] = torch.multinomial(frequencies[k], int(hit.sum()), replacement=True, generator=gen)
    return out


def fit_drum_detector(
    tokens_dir,
    codec,
    seconds: float,
    per_clip: int = 2,
    max_clips: int = 400,
    seed: int = 0,
    token_noise: float = 0.06,
    noisy_test: bool = True,
) -> DrumDetector:
    """Fit on codec-decoded segments of the train split (each also with `token_noise` of its tokens replaced, see
    the module docstring; 0: clean only); report accuracy on the test split's decoded segments, clean and (unless
    `noisy_test` is off: a fifth of the cost, the fitted detector the same) noisy.
    `tokens_dir`: a token folder, or {"train": tokens, "test": tokens} already in memory (same interface)."""
    from core.errors import UserError
    from models.train import TokenSet

    if not 0.0 <= float(token_noise) < 1.0:
        raise UserError(f"detector token_noise must be in [0, 1), got {token_noise!r}")
    gen = np.random.default_rng(seed)
    noise_gen = torch.Generator().manual_seed(seed)
    n = int(round(seconds * codec.frame_rate))
    segments = {}
    for split in ("train", "test"):
        ts = tokens_dir[split] if isinstance(tokens_dir, dict) else TokenSet(tokens_dir, split)
        segs = _segments(ts, codec, n, per_clip, gen)
        if len(segs) > max_clips:
            segs = [segs[j] for j in gen.permutation(len(segs))[:max_clips]]
        segments[split] = segs
    if len({lab for _, lab, _ in segments["train"]}) < 2:
        raise UserError("the train split needs clips with and without drums to fit the drum detector")
    frequencies = token_frequencies([c for c, _, _ in segments["train"]], codec.card)
    data = {}
    for split, segs in segments.items():
        y = np.array([lab for _, lab, _ in segs], dtype=int)
        data[split] = (_descriptors_of_decoded(codec, [c for c, _, _ in segs]), y)
        if token_noise > 0 and (split == "train" or noisy_test):
            noisy = [add_token_noise(c, token_noise, frequencies, noise_gen) for c, _, _ in segs]
            data[f"{split}_noisy"] = (_descriptors_of_decoded(codec, noisy), y)
    train_sets = [data["train"]] + ([data["train_noisy"]] if token_noise > 0 else [])
    det = DrumDetector.fit(np.vstack([X for X, _ in train_sets]), np.concatenate([y for _, y in train_sets]))
    result = {"token_noise": float(token_noise)}
    for name, (X, y) in data.items():
        said = det.probability_of(X) >= 0.5
        result[f"{name}_accuracy_decoded"] = float((said == y).mean())
        if name.startswith("test"):  # how often it calls a drum-free segment drum-bearing, and the reverse
            result[f"{name}_false_drums"] = float(said[y == 0].mean()) if (y == 0).any() else None
            result[f"{name}_missed_drums"] = float(1 - said[y == 1].mean()) if (y == 1).any() else None
        result[f"{name}_n"] = int(len(y))
    det.info = {"seconds": seconds, "codec": codec.fingerprint(), "max_segments": max_clips, "seed": seed, **result}
    return det


def matching_detector(
    path: str | Path | None, codec, seconds: float, token_noise: float, max_segments: int, seed: int
) -> DrumDetector | None:
    """The detector saved at `path` when it was fitted exactly as `fit_drum_detector` would fit one now (the same
    codec, segment length, token noise, segment budget and seed: the same detector), else None. The trait-carrying
    stage writes one; the steering evaluation, judging continuations of the same length, reuses it."""
    if not path or not Path(path).exists():
        return None
    det = DrumDetector.load(path)
    info = det.info
    same = (
        info.get("codec") == codec.fingerprint()
        and info.get("seconds") == seconds
        and info.get("token_noise") == token_noise
        and info.get("max_segments") == max_segments
        and info.get("seed") == seed
    )
    return det if same else None


def twin_pairs(tokens, trait: str = "drums") -> list[tuple[int, int]]:
    """(with, without) clip indices of a TokenSet that are the same music and differ in `trait` alone: the same
    rendered variant (mix_id), the same clip position, every other trait equal (the corpus' one-stem pairs)."""
    from collections import defaultdict

    groups = defaultdict(list)
    for i, (mix, clip, traits) in enumerate(zip(tokens.meta["mix_id"], tokens.meta["clip_id"], tokens.meta["traits"])):
        if mix and traits.get(trait) is not None:
            groups[(mix, clip.rsplit("-", 1)[-1])].append(i)
    pairs = []
    for members in groups.values():
        for i in members:
            ti = tokens.meta["traits"][i]
            for j in members:
                tj = tokens.meta["traits"][j]
                if (
                    ti[trait]
                    and not tj[trait]
                    and {k: v for k, v in ti.items() if k != trait} == {k: v for k, v in tj.items() if k != trait}
                ):
                    pairs.append((i, j))
    return pairs


@torch.no_grad()
def prompt_swap_nats(
    generator, tokens, prompt_n: int, window_n: int, trait: str = "drums", max_pairs: int = 64
) -> dict:
    """How much the generator's prediction of a continuation depends on the trait in its prompt, with no detector:
    the teacher-forced loss (nats per token, codebook 0 and all) of a clip's first `window_n` continuation frames
    after its twin's prompt (same music, the trait flipped) minus the loss after its own prompt. Near 0: the model
    ignores whether the prompt had the trait; the larger, the more it carries it."""
    import torch.nn.functional as F

    from models.generator import undo_delay

    pairs = twin_pairs(tokens, trait)[:max_pairs]
    pairs = [(a, b) for a, b in pairs if min(tokens.clip(a).shape[1], tokens.clip(b).shape[1]) >= prompt_n + window_n]
    if not pairs:
        return {"pairs": 0}

    def nll(prompt, cont):
        x = torch.cat([prompt, cont], 1)[None]
        logits = undo_delay(generator(x))[0, :, prompt_n : prompt_n + window_n]
        return -F.log_softmax(logits, -1).gather(-1, cont[..., None])[..., 0].mean(1)  # [K]

    diffs = []
    for a, b in pairs:
        A, B = tokens.clip(a), tokens.clip(b)
        for own, twin in ((A, B), (B, A)):
            cont = own[:, prompt_n : prompt_n + window_n]
            diffs.append(nll(twin[:, :prompt_n], cont) - nll(own[:, :prompt_n], cont))
    d = torch.stack(diffs)
    return {
        "pairs": len(pairs),
        "window_frames": window_n,
        "swap_nats_cb0": float(d[:, 0].mean()),
        "swap_nats": float(d.mean()),
    }


def evaluate_trait_carrying(
    generator_dir: str,
    tokens_dir: str,
    clips_dir: str | None,
    params: EvaluateCarryingParams,
    out_path: str | None = None,
    samples_dir: str | None = None,
    detector_path: str | None = None,
) -> dict:
    """Continue held-out drum / drum-free prompts and judge the continuations with the independent detector."""
    import soundfile as sf

    from models.generator import guidance_scales, load_generator, plausibility_cut, sampling_temperature
    from models.train import TokenSet

    seed = params.seed
    torch.manual_seed(seed)
    generator, codec = load_generator(generator_dir)
    prompt_n = int(round(params.prompt_seconds * codec.frame_rate))
    new_n = int(round(params.continuation_seconds * codec.frame_rate))
    token_noise = params.detector_token_noise
    guidance = guidance_scales(params.prompt_guidance, generator.cfg.n_codebooks)  # refused before the detector
    plausibility = plausibility_cut(params.prompt_plausibility)
    t0 = time.time()
    det = matching_detector(
        detector_path, codec, new_n / codec.frame_rate, token_noise, params.detector_max_segments, seed
    )
    if det is None:
        det = fit_drum_detector(
            tokens_dir,
            codec,
            new_n / codec.frame_rate,
            seed=seed,
            max_clips=params.detector_max_segments,
            token_noise=token_noise,
        )
    log.info("drum detector: %s (%.0fs)", det.info, time.time() - t0)
    test = TokenSet(tokens_dir, params.split)
    gen = np.random.default_rng(seed)
    per_class = params.prompts_per_class
    picked = {True: [], False: []}
    for i in gen.permutation(len(test)):
        lab = test.meta["traits"][int(i)].get("drums")
        c = test.clip(int(i))
        if lab is None or c.shape[1] < prompt_n + new_n or len(picked[bool(lab)]) >= per_class:
            continue
        picked[bool(lab)].append(int(i))
    results = {}
    p_real: dict[int, float] = {}  # the real continuation's judgement, once per clip
    n_samples = params.samples_per_prompt
    for mode in params.modes:
        # "<mode>_unguided": the same without prompt guidance (the baseline, in the same run)
        base_mode, guided = mode.removesuffix("_unguided"), not mode.endswith("_unguided")
        rows = []
        for lab, idx in picked.items():
            if not idx:
                continue
            prompts = torch.stack([test.clip(i)[:, :prompt_n] for i in idx])
            cond = test.condition[torch.tensor(idx)] if base_mode == "caption" else None
            attrs = test.attributes[torch.tensor(idx)] if base_mode == "caption" else None
            for r in range(n_samples):
                out = generator.generate(
                    new_n,
                    prompt=prompts,
                    condition=cond,
                    attributes=attrs,
                    temperature=sampling_temperature(params.temperature),
                    top_k=params.top_k,
                    top_p=params.top_p,
                    cfg_scale=params.cfg_scale if base_mode == "caption" else 1.0,
                    seed=seed + r,
                    prompt_guidance=guidance if guided else 1.0,
                    plausibility=plausibility if guided else 0.0,
                )
                new = [i for i in idx if i not in p_real]  # real continuations, judged once per clip
                if new:
                    real = [test.clip(i)[:, prompt_n : prompt_n + new_n] for i in new]
                    p_real.update(zip(new, det.probability_of(_descriptors_of_decoded(codec, real)).tolist()))
                p_gen = det.probability_of(_descriptors_of_decoded(codec, [c[:, prompt_n:] for c in out])).tolist()
                for j, i in enumerate(idx):
                    rows.append(
                        {
                            "clip": test.meta["clip_id"][i],
                            "sample": r,
                            "drums": lab,
                            "p_generated": p_gen[j],
                            "p_real": p_real[i],
                        }
                    )
                    if not (samples_dir and r == 0 and j < params.samples_per_class):
                        continue
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
    swap = prompt_swap_nats(generator, test, prompt_n, min(new_n, int(round(codec.frame_rate))))
    log.info("prompt swap (trait memory): %s", swap)
    report = {
        "detector": det.info,
        "prompt_frames": prompt_n,
        "continuation_frames": new_n,
        "prompt_guidance": guidance,
        "prompt_plausibility": plausibility,
        "generator_fingerprint": generator.fingerprint(),
        "summary": {"detector": det.info, "prompt_swap": swap, **{m: r["summary"] for m, r in results.items()}},
        "results": results,
    }
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(report, indent=1))
        det.save(Path(out_path).with_name("drum_detector.json"))
    return report
