"""The one audio decoder of the project: fsspec in, mono float32 at a chosen rate out, in bounded memory.

soundfile (libsndfile 1.2: wav, flac, ogg/vorbis/opus, mp3, aiff, ...) decodes; audioread (ffmpeg/gstreamer,
when the machine has one) is the fallback for local files libsndfile refuses. essentia's own decoder never sees
a file: it can take the whole process down on a corrupt one.
"""

from __future__ import annotations

import errno
import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import soundfile as sf
import soxr

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff")
_BLOCK_FRAMES = 1 << 16
_HASH_CHUNK = 1 << 22


class AudioDecodeError(RuntimeError):
    """The bytes are not audio we can decode (corrupt, empty, truncated header, not audio)."""


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    channels: int
    frames: int  # may be an estimate for compressed formats

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def sha256_of(path: str) -> tuple[str, int]:
    """Content hash and size of a file, read in chunks (memory does not grow with the file)."""
    digest = hashlib.sha256()
    size = 0
    with fsspec.open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _downmix(block: np.ndarray) -> np.ndarray:
    return block.mean(axis=1) if block.ndim == 2 else block


def _iter_soundfile(fileobj, max_seconds: float | None) -> tuple[AudioInfo, Iterator[np.ndarray]]:
    try:
        snd = sf.SoundFile(fileobj)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioDecodeError(f"not decodable audio: {e}") from None
    if snd.samplerate <= 0 or snd.channels <= 0:
        snd.close()
        raise AudioDecodeError("audio header has no sample rate or channels")
    info = AudioInfo(snd.samplerate, snd.channels, max(snd.frames, 0))
    limit = int(max_seconds * snd.samplerate) if max_seconds else None

    def blocks() -> Iterator[np.ndarray]:
        done = 0
        with snd:
            while limit is None or done < limit:
                n = _BLOCK_FRAMES if limit is None else min(_BLOCK_FRAMES, limit - done)
                try:
                    block = snd.read(n, dtype="float32", always_2d=True)
                except (sf.LibsndfileError, RuntimeError) as e:
                    raise AudioDecodeError(f"decoding failed after {done / snd.samplerate:.1f}s: {e}") from None
                if len(block) == 0:
                    return
                done += len(block)
                yield _downmix(block)

    return info, blocks()


def _iter_audioread(path: str, max_seconds: float | None) -> tuple[AudioInfo, Iterator[np.ndarray]]:
    try:
        import audioread

        reader = audioread.audio_open(path)
    except Exception as e:  # audioread raises its own family per backend, or NoBackendError
        raise AudioDecodeError(f"{type(e).__name__} {e}".strip()) from None
    info = AudioInfo(reader.samplerate, reader.channels, int(reader.duration * reader.samplerate))
    limit = int(max_seconds * reader.samplerate) if max_seconds else None

    def blocks() -> Iterator[np.ndarray]:
        done = 0
        with reader:
            for buf in reader:
                pcm = np.frombuffer(buf, dtype="<i2").astype(np.float32) / 32768.0
                block = pcm.reshape(-1, reader.channels)
                done += len(block)
                yield _downmix(block)
                if limit is not None and done >= limit:
                    return

    return info, blocks()


def stream_mono(
    path: str, sample_rate: int, max_seconds: float | None = None
) -> tuple[AudioInfo, Iterator[np.ndarray]]:
    """Open `path` (local or fsspec URL) and stream it as mono float32 blocks resampled to `sample_rate`."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    local = fs.protocol in ("file", "local", ("file", "local"))
    # libsndfile reads a local file itself; a remote one goes through fsspec's file object (Python callbacks)
    f = fs_path if local else fsspec.open(path, "rb").open()
    try:
        info, blocks = _iter_soundfile(f, max_seconds)
    except AudioDecodeError as first:
        if not local:
            f.close()
            raise
        try:
            info, blocks = _iter_audioread(path, max_seconds)
        except AudioDecodeError as second:
            raise AudioDecodeError(f"{first} (audioread fallback: {second})") from None
        f = None

    def resampled() -> Iterator[np.ndarray]:
        try:
            if info.sample_rate == sample_rate:
                yield from blocks
                return
            # soxr's streaming resampler keeps filter state across blocks: no seams at block edges.
            stream = soxr.ResampleStream(info.sample_rate, sample_rate, 1, dtype="float32", quality="HQ")
            for block in blocks:
                out = stream.resample_chunk(np.ascontiguousarray(block))
                if len(out):
                    yield out
            tail = stream.resample_chunk(np.zeros(0, np.float32), last=True)
            if len(tail):
                yield tail
        finally:
            if f is not None and not isinstance(f, str):
                f.close()

    return info, resampled()


def iter_clips(
    path: str,
    sample_rate: int,
    clip_seconds: float,
    hop_seconds: float,
    min_clip_seconds: float,
    max_seconds: float | None = None,
) -> tuple[AudioInfo, Iterator[tuple[int, float, np.ndarray]]]:
    """Cut a file into (index, start_s, mono clip) without ever holding more than one clip plus one block."""
    if hop_seconds <= 0 or clip_seconds <= 0:
        raise ValueError("clip_seconds and hop_seconds must be positive")
    info, blocks = stream_mono(path, sample_rate, max_seconds)
    clip_n = int(round(clip_seconds * sample_rate))
    hop_n = int(round(hop_seconds * sample_rate))
    min_n = int(round(min_clip_seconds * sample_rate))

    def clips() -> Iterator[tuple[int, float, np.ndarray]]:
        buf = np.zeros(0, np.float32)
        offset = 0  # sample index of buf[0] in the whole file
        index = 0
        for block in blocks:
            buf = np.concatenate([buf, block])
            while len(buf) >= clip_n:
                yield index, offset / sample_rate, buf[:clip_n].copy()
                index += 1
                drop = min(hop_n, len(buf))
                buf = buf[drop:]
                offset += drop
        if len(buf) >= min_n and (index == 0 or len(buf) > clip_n - hop_n):
            # the tail, if it holds audio not already in the previous clip and is long enough
            yield index, offset / sample_rate, buf.copy()

    return info, clips()


def decode_audio(path_or_bytes: str | bytes, sample_rate: int, max_seconds: float | None = None) -> np.ndarray:
    """Whole file (or encoded bytes) as mono float32 at `sample_rate`."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        info, blocks = _iter_soundfile(io.BytesIO(path_or_bytes), max_seconds)
        wave = np.concatenate(list(blocks) or [np.zeros(0, np.float32)])
        return resample(wave, info.sample_rate, sample_rate)
    _, blocks = stream_mono(path_or_bytes, sample_rate, max_seconds)
    return np.concatenate(list(blocks) or [np.zeros(0, np.float32)])


def resample(wave: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    if sr_in == sr_out:
        return wave.astype(np.float32, copy=False)
    return soxr.resample(wave.astype(np.float32, copy=False), sr_in, sr_out, quality="HQ")


def encode_flac(wave: np.ndarray, sample_rate: int) -> bytes:
    """16-bit mono FLAC bytes (the clips table's `audio.bytes`)."""
    out = io.BytesIO()
    sf.write(out, np.clip(wave, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
    return out.getvalue()


def decode_flac(data: bytes) -> tuple[np.ndarray, int]:
    wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    return _downmix(wave) if wave.ndim == 2 else wave, sr


def write_wav(path: str | Path, wave: np.ndarray, sample_rate: int) -> Path:
    """A 16-bit WAV written under a temporary name and renamed into place, so a failed write (a full disk, a folder
    removed) leaves no truncated file that opens as valid audio. libsndfile's own error becomes an OSError, which
    the command line prints as one line."""
    from core.files import atomic_path

    try:
        with atomic_path(path) as tmp:
            sf.write(str(tmp), wave, sample_rate, format="WAV", subtype="PCM_16")
    except sf.LibsndfileError as e:
        raise OSError(errno.EIO, f"cannot write {path}: {e}") from None
    return Path(path)
