"""What a registered artifact is on disk, read without torch: a generator directory (`generator.json`,
`generator.safetensors`, codec files) or a probe-set directory (`probe_set.json`, `probes.safetensors`). Every
registered version carries a manifest (sha256 + size of each file); downloads and cache hits are checked
against it, so a corrupted artifact is refused instead of loaded."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from registry.errors import CorruptArtifact, InvalidArtifact

MANIFEST = "smitin_manifest.json"
KINDS = {
    # kind: (metadata JSON, weights file)
    "generator": ("generator.json", "generator.safetensors"),
    "probe_set": ("probe_set.json", "probes.safetensors"),
    "coconet": ("coconet.json", "coconet.safetensors"),
}


@dataclass
class ArtifactInfo:
    kind: str
    path: Path
    meta: dict
    files: dict[str, dict]  # relative posix path -> {"sha256", "size"}
    content_hash: str  # sha256 over the manifest entries: the identity of the artifact
    trait: str | None = None
    fingerprint: str | None = None  # generator: its own; probe set: none
    generator_fingerprint: str | None = None  # probe set: the generator it was trained on
    generator_info: dict = field(default_factory=dict)  # probe set: backend / local path of a non-builtin generator
    metrics: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)

    def manifest(self) -> dict:
        return {
            "format": "smitin-manifest/1",
            "kind": self.kind,
            "content_hash": self.content_hash,
            "files": self.files,
        }


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def content_hash(files: dict[str, dict]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name]['sha256']}\0{files[name]['size']}\n".encode())
    return h.hexdigest()


def detect_kind(directory: Path) -> str | None:
    for kind, (meta_name, _) in KINDS.items():
        if (directory / meta_name).exists():
            return kind
    return None


def check_safetensors(path: Path) -> None:
    """Header and size check (8-byte length, JSON header, data extent) without loading any framework."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8 or n > 100 * (1 << 20):
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            raise ValueError(f"data ends at byte {8 + n + end}, file has {size}")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise InvalidArtifact(f"{path} is not a valid safetensors file ({e})") from None


def flatten(d: dict, prefix: str = "", sep: str = ".") -> dict:
    out: dict = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out


def numeric(d: dict) -> dict[str, float]:
    """The finite numbers of a (flattened) metrics dict; bools and strings are not metrics."""
    out = {}
    for k, v in flatten(d).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf"):
            out[k] = float(v)
    return out


def list_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))


def inspect_dir(directory: str | Path, kind: str | None = None) -> ArtifactInfo:
    """Validate a generator / probe-set directory and describe it. Raises `InvalidArtifact` with the reason."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidArtifact(f"{directory} is not a directory")
    kind = kind or detect_kind(directory)
    if kind not in KINDS:
        raise InvalidArtifact(
            f"{directory} is neither a generator ({KINDS['generator'][0]}), a probe set "
            f"({KINDS['probe_set'][0]}) nor a Coconet ({KINDS['coconet'][0]})"
        )
    meta_name, weights_name = KINDS[kind]
    for name in (meta_name, weights_name):
        if not (directory / name).is_file():
            raise InvalidArtifact(f"{directory} is not a {kind.replace('_', ' ')}: {name} is missing")
    try:
        meta = json.loads((directory / meta_name).read_text())
    except (OSError, ValueError) as e:
        raise InvalidArtifact(f"{directory / meta_name} is not valid JSON ({e})") from None
    check_safetensors(directory / weights_name)
    files = {
        p.relative_to(directory).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in list_files(directory)
    }
    info = ArtifactInfo(kind=kind, path=directory, meta=meta, files=files, content_hash=content_hash(files))
    if kind == "generator":
        info.fingerprint = meta.get("fingerprint")
        if not info.fingerprint:
            raise InvalidArtifact(f"{directory / meta_name} has no fingerprint")
        info.params = flatten({"config": meta.get("config", {}), "codec": meta.get("codec", {})})
        info.metrics = numeric(meta.get("metrics", {}))
    elif kind == "coconet":
        info.fingerprint = meta.get("fingerprint")
        if not info.fingerprint or not isinstance(meta.get("config"), dict):
            raise InvalidArtifact(f"{directory / meta_name} has no fingerprint or config")
        info.params = flatten({"config": meta["config"], "train": meta.get("train_params", {})})
        info.metrics = {f"train.{k}": v for k, v in numeric(meta.get("metrics", {})).items()}
    else:
        for key in ("trait", "generator_fingerprint"):
            if not meta.get(key):
                raise InvalidArtifact(f"{directory / meta_name} has no {key}")
        info.trait = meta["trait"]
        info.generator_fingerprint = meta["generator_fingerprint"]
        info.generator_info = meta.get("generator") if isinstance(meta.get("generator"), dict) else {}
        info.params = flatten(
            {"params": meta.get("params", {}), **{k: meta[k] for k in ("n_layers", "n_heads", "head_dim") if k in meta}}
        )
        info.metrics = numeric(meta.get("metrics", {}))
    return info


def write_manifest(info: ArtifactInfo, directory: Path) -> Path:
    path = Path(directory) / MANIFEST
    path.write_text(json.dumps(info.manifest(), indent=2, sort_keys=True) + "\n")
    return path


def verify_dir(directory: Path, expected_hash: str | None, full: bool = True, what: str = "") -> dict:
    """Check a downloaded / cached copy against its manifest (and the manifest against the registry's recorded
    content hash). `full=False` checks presence and sizes only (a cache hit); `full=True` re-hashes every file."""
    directory = Path(directory)
    what = what or str(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError):
        raise CorruptArtifact(f"{what}: the manifest {MANIFEST} is missing or unreadable") from None
    if expected_hash and content_hash(files) != expected_hash:
        raise CorruptArtifact(f"{what}: manifest does not match the content hash recorded in the registry")
    for name, entry in sorted(files.items()):
        p = directory / name
        if not p.is_file():
            raise CorruptArtifact(f"{what}: {name} is missing")
        if p.stat().st_size != entry["size"]:
            raise CorruptArtifact(f"{what}: {name} has {p.stat().st_size} bytes, {entry['size']} were registered")
        if full and sha256_file(p) != entry["sha256"]:
            raise CorruptArtifact(f"{what}: {name} is corrupted (sha256 differs from the registered one)")
    return manifest
