"""Audio codecs: waveform <-> K parallel streams of discrete codes (the generator's vocabulary).

`MelRVQCodec` (the default) trains on a CPU in minutes: log-mel frames, standardised per band, quantised by
residual k-means (codebook k quantises what codebooks < k left over). Two decoders turn the dequantised log-mel back
into sound, both measured in `benchmarks/codec.py`:
- `network` (the default when the codec has one): a Vocos-style network trained on the codec's own quantised
  training frames predicts STFT magnitude and phase; an inverse STFT gives the samples (`models/codec_decoder.py`).
- `griffin_lim` (the fallback, no training): an STFT magnitude from the log-mel, by `inversion` `learned` (a
  ridge-regression map fitted on the training frames) or `pinv` (the mel filterbank's pseudo-inverse), and phase
  from Griffin-Lim.

`EncodecCodec` wraps a Hugging Face `EncodecModel` loaded from a local folder (users with weights; nothing is
downloaded).

Every codec: `encode(wave, sr) -> LongTensor[K, T]`, `decode(codes) -> np.ndarray` at `codec.sample_rate`,
attributes `frame_rate`, `n_codebooks`, `card`, `sample_rate`, `save(dir)` (safetensors + JSON), `identity()`,
`fingerprint()`; `load_codec(dir)` reads either kind.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from core.audio import resample
from core.errors import UserError
from models.codec_decoder import DecoderConfig, DecoderParams, MelDecoder, decode_features, fit_decoder

CODEC_WEIGHTS = "codec.safetensors"
CODEC_CONFIG = "codec.json"


class CodecError(UserError):
    """Bad codec input or checkpoint."""


@dataclass
class MelCodecConfig:
    sample_rate: int = 16000  # drums, bass and piano live below 8 kHz; half the rate halves every cost
    n_fft: int = 1024
    hop: int = 400  # 40 frames/s: a drum hit lands in its own frame at any usual tempo
    n_mels: int = 64
    fmin: float = 30.0
    n_codebooks: int = 4
    card: int = 256
    kmeans_iters: int = 25
    inversion: str = "learned"  # learned | pinv (the Griffin-Lim decoder's log-mel -> magnitude map)
    griffin_lim_iters: int = 48
    decoder: str = "network"  # network (when the codec has one) | griffin_lim

    @classmethod
    def debug(cls, **overrides) -> MelCodecConfig:
        base = dict(n_mels=32, n_codebooks=4, card=32, kmeans_iters=8, griffin_lim_iters=8)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_dict(cls, d: dict) -> MelCodecConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _mel_filters(cfg: MelCodecConfig) -> np.ndarray:
    import librosa

    return librosa.filters.mel(
        sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.sample_rate / 2
    ).astype(np.float32)


def _kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Plain Lloyd k-means on x [N, D] with k-means++ seeding on a subsample; returns centroids [k, D]."""
    n = x.shape[0]
    sub = x[torch.randperm(n, generator=gen)[: min(n, 20000)]]
    centroids = [sub[torch.randint(len(sub), (1,), generator=gen)].squeeze(0)]
    d2 = ((sub - centroids[0]) ** 2).sum(1)
    for _ in range(1, k):
        idx = torch.multinomial(d2 + 1e-12, 1, generator=gen)
        centroids.append(sub[idx].squeeze(0))
        d2 = torch.minimum(d2, ((sub - centroids[-1]) ** 2).sum(1))
    c = torch.stack(centroids)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp(min=1)[:, None])
        if empty.any():  # re-seed dead centroids on random frames
            c[empty] = x[torch.randint(n, (int(empty.sum()),), generator=gen)]
    return c


class MelRVQCodec:
    kind = "mel_rvq"

    def __init__(
        self,
        cfg: MelCodecConfig,
        mean: torch.Tensor,
        std: torch.Tensor,
        codebooks: torch.Tensor,
        inverse: torch.Tensor | None = None,
        network: MelDecoder | None = None,
    ):
        self.cfg = cfg
        self.mean, self.std = mean.float(), std.float()  # [n_mels] per-band standardisation of log-mel
        self.codebooks = codebooks.float()  # [K, card, n_mels]
        self.mel_fb = torch.from_numpy(_mel_filters(cfg))  # [n_mels, n_freq]
        # learned inversion: log-mel (standardised, plus a bias column) -> log-magnitude [n_mels + 1, n_freq]
        self.inverse = inverse.float() if inverse is not None else None
        self.window = torch.hann_window(cfg.n_fft)
        self.network = network.eval() if network is not None else None  # the learned decoder, if trained
        self.network_training: dict | None = None  # fit_network's summary (saved beside the config, for the record)

    # -- the codec interface
    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    @property
    def frame_rate(self) -> float:
        return self.cfg.sample_rate / self.cfg.hop

    @property
    def n_codebooks(self) -> int:
        return self.cfg.n_codebooks

    @property
    def card(self) -> int:
        return self.cfg.card

    def features(self, wave: np.ndarray, sr: int) -> torch.Tensor:
        """Standardised log-mel frames [T, n_mels] of a mono wave (T = len // hop + 1 at the codec rate)."""
        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim != 1:
            raise CodecError(f"expected a mono wave (1-D), got shape {wave.shape}")
        x = torch.from_numpy(resample(wave, sr, self.cfg.sample_rate).copy())
        if len(x) < self.cfg.n_fft // 2 + 1:
            x = torch.nn.functional.pad(x, (0, self.cfg.n_fft // 2 + 1 - len(x)))
        spec = torch.stft(x, self.cfg.n_fft, self.cfg.hop, window=self.window, return_complex=True).abs()
        logmel = torch.log(self.mel_fb @ spec.pow(2) + 1e-6).T  # [T, n_mels]
        return (logmel - self.mean) / self.std

    def quantize(self, feats: torch.Tensor) -> torch.Tensor:
        """Residual quantisation of standardised log-mel [T, n_mels] -> codes [K, T]."""
        residual, codes = feats, []
        for cb in self.codebooks:
            idx = torch.cdist(residual, cb).argmin(1)
            codes.append(idx)
            residual = residual - cb[idx]
        return torch.stack(codes)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        codes = torch.as_tensor(codes)
        if codes.dim() != 2 or codes.shape[0] != self.n_codebooks:
            raise CodecError(f"codes must be [{self.n_codebooks}, T], got {list(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.card):
            raise CodecError(f"codes out of range [0, {self.card})")
        return sum(self.codebooks[k][codes[k].long()] for k in range(self.n_codebooks))

    def encode(self, wave: np.ndarray, sr: int) -> torch.Tensor:
        return self.quantize(self.features(wave, sr))

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        return self.features_to_wave(self.dequantize(codes))

    @property
    def decoder(self) -> str:
        """The decoder `decode` uses: the configured one, or Griffin-Lim when the codec has no trained network."""
        return "network" if self.cfg.decoder == "network" and self.network is not None else "griffin_lim"

    def features_to_wave(
        self, feats: torch.Tensor, inversion: str | None = None, decoder: str | None = None
    ) -> np.ndarray:
        """Standardised log-mel [T, n_mels] -> wave, by the learned network or by a magnitude estimate (`inversion`)
        and Griffin-Lim."""
        decoder = decoder or self.decoder
        if decoder == "network":
            if self.network is None:
                raise CodecError("this codec has no trained decoder network (fit it again, or use griffin_lim)")
            return decode_features(self.network, feats)
        mag = self.magnitude(feats, inversion or self.cfg.inversion)
        return _griffin_lim(mag, self.cfg.n_fft, self.cfg.hop, self.window, self.cfg.griffin_lim_iters)

    def magnitude(self, feats: torch.Tensor, inversion: str) -> torch.Tensor:
        """[n_freq, T] linear magnitude from standardised log-mel."""
        if inversion == "learned" and self.inverse is not None:
            ones = torch.ones(feats.shape[0], 1)
            return torch.exp(torch.cat([feats, ones], 1) @ self.inverse).T.clamp(max=1e3)
        power_mel = torch.exp(feats * self.std + self.mean)  # [T, n_mels]
        pinv = torch.linalg.pinv(self.mel_fb)  # [n_freq, n_mels]
        return (pinv @ power_mel.T).clamp(min=0).sqrt()

    # -- fitting
    @classmethod
    def fit(
        cls, waves: Iterable[tuple[np.ndarray, int]], cfg: MelCodecConfig, seed: int = 0, max_frames: int = 400_000
    ) -> MelRVQCodec:
        """Fit standardisation, residual k-means codebooks and the learned inversion on (wave, sr) pairs."""
        gen = torch.Generator().manual_seed(seed)
        probe = cls(
            cfg, torch.zeros(cfg.n_mels), torch.ones(cfg.n_mels), torch.zeros(cfg.n_codebooks, cfg.card, cfg.n_mels)
        )
        logmels, mags = [], []
        for wave, sr in waves:
            x = torch.from_numpy(resample(np.asarray(wave, np.float32), sr, cfg.sample_rate).copy())
            if len(x) <= cfg.n_fft:
                continue
            spec = torch.stft(x, cfg.n_fft, cfg.hop, window=probe.window, return_complex=True).abs()
            logmels.append(torch.log(probe.mel_fb @ spec.pow(2) + 1e-6).T)
            mags.append(torch.log(spec + 1e-4).T)
        if not logmels:
            raise CodecError("no audio to fit the codec on (empty split, or every clip shorter than one frame)")
        logmel, logmag = torch.cat(logmels), torch.cat(mags)
        if len(logmel) > max_frames:
            keep = torch.randperm(len(logmel), generator=gen)[:max_frames]
            logmel, logmag = logmel[keep], logmag[keep]
        if len(logmel) < cfg.card:
            raise CodecError(f"only {len(logmel)} frames to fit {cfg.card} centroids: give the codec more audio")
        mean, std = logmel.mean(0), logmel.std(0).clamp(min=1e-3)
        feats = (logmel - mean) / std
        residual, books = feats, []
        for _ in range(cfg.n_codebooks):
            c = _kmeans(residual, cfg.card, cfg.kmeans_iters, gen)
            books.append(c)
            residual = residual - c[torch.cdist(residual, c).argmin(1)]
        # learned inversion: ridge regression from standardised (quantised) log-mel to log-magnitude
        quantised = feats - residual
        design = torch.cat([quantised, torch.ones(len(quantised), 1)], 1).double()
        ridge = 1e-2 * torch.eye(design.shape[1], dtype=torch.float64)
        inverse = torch.linalg.solve(design.T @ design + ridge, design.T @ logmag.double()).float()
        return cls(cfg, mean, std, torch.stack(books), inverse)

    def fit_network(self, waves: Iterable[tuple[np.ndarray, int]], params: DecoderParams, seed: int = 0) -> dict:
        """Train the learned decoder on these clips' quantised features (what `decode` will be given); returns the
        training summary. The codebooks are not changed, so codes from before decode with the new network too."""
        feats, targets = [], []
        hop = self.cfg.hop
        for wave, sr in waves:
            x = resample(np.asarray(wave, np.float32), sr, self.cfg.sample_rate)
            q = self.dequantize(self.encode(x, self.cfg.sample_rate))
            n = hop * (q.shape[0] - 1)
            y = torch.from_numpy(np.ascontiguousarray(x[:n]))
            feats.append(q)
            targets.append(torch.nn.functional.pad(y, (0, n - len(y))))
        if not feats:
            raise CodecError("no audio to train the codec's decoder on")
        try:
            network, summary = fit_decoder(
                feats, targets, self.cfg.n_mels, self.cfg.n_fft, hop, self.mel_fb, params, seed
            )
        except ValueError as e:
            raise CodecError(str(e)) from None
        self.network, self.network_training = network, summary
        return summary

    # -- persistence
    def identity(self) -> dict:
        return {
            "kind": self.kind,
            "n_codebooks": self.n_codebooks,
            "card": self.card,
            "frame_rate": self.frame_rate,
            "sample_rate": self.sample_rate,
            "fingerprint": self.fingerprint(),
        }

    def fingerprint(self) -> str:
        config = asdict(self.cfg)
        if self.network is None:
            # without a network the decoder is Griffin-Lim whatever the config says; leaving the key out keeps the
            # fingerprints of codecs saved before the network existed, which their generators and tokens record
            config.pop("decoder")
        h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
        for t in (self.mean, self.std, self.codebooks) + ((self.inverse,) if self.inverse is not None else ()):
            h.update(t.contiguous().numpy().tobytes())
        for name, t in sorted(self._network_tensors().items()):
            h.update(name.encode() + t.contiguous().numpy().tobytes())
        return h.hexdigest()[:32]

    def _network_tensors(self) -> dict[str, torch.Tensor]:
        if self.network is None:
            return {}
        return {f"network.{k}": v.detach().float() for k, v in self.network.state_dict().items()}

    def save(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"mean": self.mean, "std": self.std, "codebooks": self.codebooks}
        if self.inverse is not None:
            tensors["inverse"] = self.inverse
        tensors.update(self._network_tensors())
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / CODEC_WEIGHTS))
        meta = {"kind": self.kind, "config": asdict(self.cfg), "fingerprint": self.fingerprint()}
        if self.network is not None:
            meta["network"] = asdict(self.network.cfg)
        if self.network_training is not None:
            meta["network_training"] = self.network_training
        (directory / CODEC_CONFIG).write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_files(cls, directory: Path, meta: dict) -> MelRVQCodec:
        from safetensors.torch import load_file

        t = load_file(str(directory / CODEC_WEIGHTS))
        cfg = MelCodecConfig.from_dict(meta["config"])
        network = None
        if "network" in meta:
            # its initial weights are overwritten at once: drawing them must not move the caller's random stream
            # (a generator trained after loading the codec would otherwise start from other weights)
            with torch.random.fork_rng(devices=[]):
                network = MelDecoder(cfg.n_mels, cfg.n_fft, cfg.hop, DecoderConfig.from_dict(meta["network"]))
            state = {k.removeprefix("network."): v for k, v in t.items() if k.startswith("network.")}
            try:
                network.load_state_dict(state)
            except RuntimeError as e:
                raise CodecError(f"{directory}: the decoder network does not match its config ({e})") from None
        return cls(cfg, t["mean"], t["std"], t["codebooks"], t.get("inverse"), network)


def _griffin_lim(mag: torch.Tensor, n_fft: int, hop: int, window: torch.Tensor, iters: int) -> np.ndarray:
    """Fast Griffin-Lim (momentum 0.99, Perraudin et al. 2013) from a magnitude [n_freq, T]."""
    gen = torch.Generator().manual_seed(0)  # deterministic phase init: the same codes decode to the same audio
    angles = torch.exp(2j * math.pi * torch.rand(mag.shape, generator=gen))
    length = hop * (mag.shape[1] - 1)
    prev = torch.zeros_like(angles)
    for _ in range(iters):
        wave = torch.istft(mag * angles, n_fft, hop, window=window, length=length)
        rebuilt = torch.stft(wave, n_fft, hop, window=window, return_complex=True)
        accel = rebuilt - 0.99 * prev
        prev = rebuilt
        angles = accel / (accel.abs() + 1e-8)
    wave = torch.istft(mag * angles, n_fft, hop, window=window, length=length).numpy()
    peak = np.abs(wave).max() if wave.size else 0.0
    return (wave / peak * 0.9 if peak > 1.0 else wave).astype(np.float32)


class EncodecCodec:
    """A Hugging Face `EncodecModel` from a local folder (`save_pretrained` layout); nothing is downloaded."""

    kind = "encodec"

    def __init__(self, model, bandwidth: float | None = None):
        self.model = model.eval()
        config = model.config
        self.bandwidth = bandwidth if bandwidth is not None else min(config.target_bandwidths)
        self._n_codebooks = int(self.model.quantizer.get_num_quantizers_for_bandwidth(self.bandwidth))

    @classmethod
    def from_pretrained(cls, path: str | Path, bandwidth: float | None = None) -> EncodecCodec:
        from transformers import EncodecModel

        path = Path(path)
        if not (path / "config.json").exists():
            raise CodecError(f"no EnCodec weights in {path} (expected a save_pretrained folder with config.json)")
        return cls(EncodecModel.from_pretrained(str(path), local_files_only=True), bandwidth)

    @property
    def sample_rate(self) -> int:
        return int(self.model.config.sampling_rate)

    @property
    def frame_rate(self) -> float:
        return float(self.model.config.frame_rate)

    @property
    def n_codebooks(self) -> int:
        return self._n_codebooks

    @property
    def card(self) -> int:
        return int(self.model.config.codebook_size)

    @torch.no_grad()
    def encode(self, wave: np.ndarray, sr: int) -> torch.Tensor:
        x = torch.from_numpy(resample(np.asarray(wave, np.float32), sr, self.sample_rate).copy())
        p = next(self.model.parameters())  # the model may sit on a GPU and / or in half precision
        out = self.model.encode(x[None, None].to(p.device, p.dtype), bandwidth=self.bandwidth)
        return out.audio_codes[0, 0].long().cpu()  # [K, T]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> np.ndarray:
        codes = torch.as_tensor(codes).long()
        if codes.dim() != 2 or codes.shape[0] != self.n_codebooks:
            raise CodecError(f"codes must be [{self.n_codebooks}, T], got {list(codes.shape)}")
        audio = self.model.decode(codes[None, None].to(next(self.model.parameters()).device), [None])[0]
        return audio[0, 0].float().cpu().numpy().astype(np.float32)

    def identity(self) -> dict:
        return {
            "kind": self.kind,
            "n_codebooks": self.n_codebooks,
            "card": self.card,
            "frame_rate": self.frame_rate,
            "sample_rate": self.sample_rate,
            "fingerprint": self.fingerprint(),
        }

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.model.config.to_json_string().encode() + str(self.bandwidth).encode())
        for name, t in sorted(self.model.state_dict().items()):
            t = t.detach().float() if t.is_floating_point() else t.detach()  # float32 bytes whatever the dtype
            h.update(name.encode() + t.cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:32]

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.model.save_pretrained(str(directory / "encodec"))  # safetensors + config.json
        meta = {"kind": self.kind, "bandwidth": self.bandwidth, "fingerprint": self.fingerprint()}
        (directory / CODEC_CONFIG).write_text(json.dumps(meta, indent=2))


def load_codec(directory: str | Path):
    directory = Path(directory)
    path = directory / CODEC_CONFIG
    if not path.exists():
        raise CodecError(f"no codec in {directory} (missing {CODEC_CONFIG}); run `smitin codec fit` first")
    meta = json.loads(path.read_text())
    if meta.get("kind") == MelRVQCodec.kind:
        return MelRVQCodec.from_files(directory, meta)
    if meta.get("kind") == EncodecCodec.kind:
        return EncodecCodec.from_pretrained(directory / "encodec", meta.get("bandwidth"))
    raise CodecError(f"unknown codec kind {meta.get('kind')!r} in {path}")
