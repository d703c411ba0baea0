"""Per-clip music features: tempo, beats, downbeats + meter, key, chords, loudness.

`ClipAnalyzer` holds essentia's algorithms (not picklable, not thread-safe): build one per worker process, in
`DoFn.setup`. Every result is plain Python, ready for a clips-table row.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipelines.chords import beat_sync, merge_segments, to_harte, viterbi_chords

_HPCP_FRAME = 4096
_HPCP_HOP = 2048


@dataclass(frozen=True)
class FeatureParams:
    analysis_sample_rate: int = 44100
    key_profile: str = "bgate"
    rhythm_method: str = "multifeature"
    chord_method: str = "hmm"
    chord_self_transition: float = 0.5
    silence_dbfs: float = -60.0
    meters: tuple[int, ...] = field(default=(2, 3, 4))
    downbeat_evidence: str = "chroma_bass"  # chroma_bass | onsets_chords (adds low-band onsets, chord changes)
    # Tempo octave: a beat level faster than this is taken as the subdivision and every other beat is kept
    # (the phase with the stronger bass / harmonic-change evidence); 0 disables.
    tempo_halve_above_bpm: float = 150.0
    # Added to a meter's bar-phase score (contrast of z-scored evidence). Meter 2 is favoured: on a 4/4 bar it
    # still scores F=0.67 with either half-bar phase, where a wrong 4/4 phase scores 0.
    meter_bias: tuple[tuple[int, float], ...] = ((2, 0.3), (3, -0.1), (4, 0.0))

    @classmethod
    def from_params(cls, section: dict) -> "FeatureParams":
        names = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in section.items() if k in names}
        if "meters" in kwargs:
            kwargs["meters"] = tuple(kwargs["meters"])
        if "meter_bias" in kwargs:
            mb = kwargs["meter_bias"]
            kwargs["meter_bias"] = tuple((int(k), float(v)) for k, v in (mb.items() if isinstance(mb, dict) else mb))
        return cls(**kwargs)


@dataclass
class ClipFeatures:
    is_silent: bool
    tempo_bpm: float | None = None
    tempo_confidence: float | None = None
    beats_s: list[float] = field(default_factory=list)
    downbeats_s: list[float] = field(default_factory=list)
    time_signature: str | None = None
    key: str | None = None
    mode: str | None = None
    key_strength: float | None = None
    chords: list[dict] = field(default_factory=list)
    loudness_lufs: float | None = None


def tempo_from_beats(beats: np.ndarray) -> float | None:
    """bpm from the median inter-beat interval (robust to a missed or doubled beat)."""
    if len(beats) < 2:
        return None
    return float(60.0 / np.median(np.diff(beats)))


def halve_fast_beats(beats: np.ndarray, chroma: np.ndarray, times: np.ndarray, low: np.ndarray, duration: float,
                     max_bpm: float, min_contrast: float = 0.3) -> np.ndarray:
    """Tempo octave decision: beat trackers on dense textures (chorales with eighth-note passing tones) often lock
    to the subdivision. Above `max_bpm` (a prior: the beat level of most music lies well below it) keep every
    other beat, in the phase whose beats carry more bass / kick energy and harmonic change, provided the two
    phases differ by at least `min_contrast` (z units of that evidence summed)."""
    if max_bpm <= 0 or len(beats) < 6:
        return beats
    bpm = tempo_from_beats(beats)
    if bpm is None or bpm <= max_bpm:
        return beats
    from pipelines.chords import beat_sync

    cpb = beat_sync(chroma, times, np.concatenate([beats, [duration]]))
    unit = cpb / np.maximum(np.linalg.norm(cpb, axis=1, keepdims=True), 1e-9)
    change = np.zeros(len(beats))
    change[1:] = 1.0 - np.sum(unit[1:] * unit[:-1], axis=1)
    change[0] = np.median(change[1:])
    f = np.searchsorted(times, beats).clip(0, max(len(low) - 1, 0))
    bass = np.log1p(low[f]) if len(low) else np.zeros(len(beats))
    ev = _z(change) + _z(bass)
    # Contrast of one phase over the other, taken on the weaker half of its beats: a bar-level accent (every 4th
    # beat louder) lifts only one half and is no sign of a subdivision; a true subdivision makes every other beat
    # weak.
    contrast = []
    for q in (0, 1):
        on, off = ev[q::2], ev[1 - q::2]
        contrast.append(min(on[0::2].mean(), on[1::2].mean()) - off.mean() if len(on) >= 2 else 0.0)
    q = int(np.argmax(contrast))
    if contrast[q] < min_contrast:
        return beats  # alternate beats alike (a click track, an even pulse, bar accents only)
    return beats[q::2]


def estimate_downbeats(beats: np.ndarray, chroma_per_beat: np.ndarray, bass_per_beat: np.ndarray,
                       meters=(2, 3, 4), extra: list[np.ndarray] | None = None,
                       meter_bias: dict | None = None) -> tuple[np.ndarray, int]:
    """Pick the meter and bar phase whose downbeats coincide best with chord changes and bass onsets.

    essentia has no downbeat tracker and the neural ones do not install offline, so this is a small
    interpretable estimate: harmony tends to change, and the bass (or kick) tends to sound, at the start
    of a bar. For each meter m and phase p the score is the z-scored mean of that evidence on beats
    i = p (mod m); the best (m, p) wins. Meter 2 and 4 are confusable; 4 is preferred on near ties.
    """
    n = len(beats)
    if n < 4:
        return np.asarray(beats[:1], dtype=float), 4
    unit = chroma_per_beat / np.maximum(np.linalg.norm(chroma_per_beat, axis=1, keepdims=True), 1e-9)
    change = np.zeros(n)
    change[1:] = 1.0 - np.sum(unit[1:] * unit[:-1], axis=1)
    change[0] = np.median(change[1:]) if n > 1 else 0.0

    def z(x):
        return (x - x.mean()) / (x.std() + 1e-9)

    evidence = z(change) + z(bass_per_beat)
    for e in extra or []:  # further per-beat evidence (bass onsets, chord-label changes), z-scored alike
        evidence = evidence + z(np.asarray(e, float))
    best = (-np.inf, 4, 0)
    for m in meters:
        if n < 2 * m:
            continue
        for p in range(m):
            on = evidence[p::m]
            off = np.delete(evidence, np.arange(p, n, m))
            score = on.mean() - off.mean()
            if meter_bias is None:
                score += 0.05 if m == 4 else 0.0  # tie-break toward the commonest meter
            else:
                score += float(meter_bias.get(m, 0.0))
            if score > best[0]:
                best = (score, m, p)
    _, m, p = best
    return beats[p::m], m


class ClipAnalyzer:
    """All clip features in one pass. Build once per process (essentia algorithms are heavy and stateful)."""

    def __init__(self, params: FeatureParams):
        import essentia
        import essentia.standard as es
        import pyloudnorm

        essentia.log.infoActive = False
        essentia.log.warningActive = False
        self.params = params
        sr = params.analysis_sample_rate
        self._rhythm = es.RhythmExtractor2013(method=params.rhythm_method)
        self._key = es.KeyExtractor(profileType=params.key_profile, sampleRate=sr)
        self._window = es.Windowing(type="blackmanharris62")
        self._spectrum = es.Spectrum()
        self._peaks = es.SpectralPeaks(orderBy="magnitude", magnitudeThreshold=1e-5, minFrequency=40,
                                       maxFrequency=5000, maxPeaks=100, sampleRate=sr)
        # referenceFrequency 440 puts A at bin 0; we roll to C below.
        self._hpcp = es.HPCP(size=12, referenceFrequency=440, sampleRate=sr, harmonics=4,
                             nonLinear=False, normalized="unitMax")
        self._chords_essentia = es.ChordsDetectionBeats(hopSize=_HPCP_HOP, sampleRate=sr)
        self._meter = pyloudnorm.Meter(sr)
        self._es = es

    # -- pieces -------------------------------------------------------------------------------------------
    def _hpcp_frames(self, wave: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(frames x 12 chroma, C-based), frame centre times, low-band energy per frame (bass/kick)."""
        sr = self.params.analysis_sample_rate
        chroma, low = [], []
        freqs = np.fft.rfftfreq(_HPCP_FRAME, 1 / sr)
        low_bins = freqs < 150.0
        for frame in self._es.FrameGenerator(wave, frameSize=_HPCP_FRAME, hopSize=_HPCP_HOP, startFromZero=True):
            spec = self._spectrum(self._window(frame))
            chroma.append(self._hpcp(*self._peaks(spec)))
            low.append(float(np.sum(spec[low_bins] ** 2)))
        chroma = np.asarray(chroma, dtype=float).reshape(-1, 12)
        chroma = np.roll(chroma, -3, axis=1)  # bin 0 = A -> bin 0 = C: new[c] = old[(c + 3) % 12]
        times = (np.arange(len(chroma)) * _HPCP_HOP + _HPCP_FRAME / 2) / sr
        return chroma, times, np.asarray(low)

    def _loudness(self, wave: np.ndarray) -> float | None:
        sr = self.params.analysis_sample_rate
        if len(wave) < int(0.4 * sr):  # BS.1770 needs at least one 400 ms block
            return None
        value = self._meter.integrated_loudness(wave.astype(np.float64))
        return float(value) if np.isfinite(value) else None

    # -- all ----------------------------------------------------------------------------------------------
    def analyze(self, wave: np.ndarray) -> ClipFeatures:
        wave = np.ascontiguousarray(wave, dtype=np.float32)
        sr = self.params.analysis_sample_rate
        duration = len(wave) / sr
        rms = float(np.sqrt(np.mean(wave.astype(np.float64) ** 2))) if len(wave) else 0.0
        if rms <= 10 ** (self.params.silence_dbfs / 20):
            # No tempo/key/chord claims about silence.
            return ClipFeatures(is_silent=True, loudness_lufs=self._loudness(wave))

        bpm_es, beats, confidence, _, _ = self._rhythm(wave)
        beats = np.asarray(beats, dtype=float)
        beats = beats[(beats >= 0) & (beats < duration)]
        key, scale, strength = self._key(wave)

        chroma, times, low = self._hpcp_frames(wave)
        beats = halve_fast_beats(beats, chroma, times, low, duration, self.params.tempo_halve_above_bpm)
        boundaries = np.unique(np.concatenate([[0.0], beats, [duration]]))
        seg_chroma = beat_sync(chroma, times, boundaries)
        if self.params.chord_method == "essentia" and len(beats) >= 2:
            hpcp_a = np.roll(chroma, 3, axis=1).astype(np.float32)  # back to essentia's A-based bins
            labels_es, _ = self._chords_essentia(self._es.array(hpcp_a), self._es.array(beats.astype(np.float32)))
            bounds = np.asarray(beats)
            labels = [to_harte(lab) for lab in labels_es][: len(bounds) - 1]
            chords = merge_segments(bounds[: len(labels) + 1], labels)
        else:
            labels = viterbi_chords(seg_chroma, self_transition=self.params.chord_self_transition)
            chords = merge_segments(boundaries, labels)

        # Downbeat evidence per beat: chroma of the beat interval starting there, low-band energy at it.
        if len(beats) >= 4:
            beat_bounds = np.concatenate([beats, [duration]])
            chroma_per_beat = beat_sync(chroma, times, beat_bounds)
            low_frame = np.searchsorted(times, beats).clip(0, max(len(low) - 1, 0))
            bass_per_beat = np.log1p(low[low_frame]) if len(low) else np.zeros(len(beats))
            extra = []
            if self.params.downbeat_evidence == "onsets_chords" and len(low):
                # low-band onset: rise of log energy into the beat's frame (a kick or a new bass note)
                log_low = np.log1p(low)
                prev = (low_frame - 1).clip(0, None)
                extra.append(np.maximum(log_low[low_frame] - log_low[prev], 0.0))
                # chord-label change at the beat (harmonic rhythm follows the bar)
                beat_labels = viterbi_chords(chroma_per_beat, self_transition=self.params.chord_self_transition)
                changes = np.array([float(a != b) for a, b in zip(beat_labels[1:], beat_labels[:-1])])
                extra.append(np.r_[changes.mean() if len(changes) else 0.0, changes])  # beat 0: no evidence
            downbeats, meter = estimate_downbeats(beats, chroma_per_beat, bass_per_beat, self.params.meters, extra,
                                                  dict(self.params.meter_bias))
            time_signature = f"{meter}/4"
        else:
            downbeats, time_signature = beats[:1], None

        tempo = tempo_from_beats(beats)
        if self.params.rhythm_method != "multifeature":
            # degara reports no confidence; use beat regularity (1 - CV of intervals) scaled to essentia's 0-5.3
            ibi = np.diff(beats)
            confidence = float(5.32 * max(0.0, 1.0 - ibi.std() / ibi.mean())) if len(ibi) > 1 else 0.0
        return ClipFeatures(
            is_silent=False,
            tempo_bpm=tempo,
            tempo_confidence=float(confidence),
            beats_s=[float(b) for b in beats],
            downbeats_s=[float(b) for b in downbeats],
            time_signature=time_signature,
            key=key,
            mode=scale,
            key_strength=float(strength),
            chords=chords,
            loudness_lufs=self._loudness(wave),
        )



def _z(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, float)
    return (x - x.mean()) / (x.std() + 1e-9)
