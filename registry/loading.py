"""Resolve `models:/name@alias` (or `models:/name/3`, or a plain local directory) to files on disk, through a
local cache keyed by content hash: resolving is one registry query, loading a cached version touches no network
and copies nothing. Downloads are verified against the registered manifest before they enter the cache."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from registry.artifacts import MANIFEST, inspect_dir, verify_dir
from registry.errors import CorruptArtifact, IncompatibleProbeSet, ModelNotFound, RegistryError
from registry.store import CHAMPION, PENDING, TAG, Registry, first_line, translate_errors

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


@dataclass
class LocalModel:
    """A generator or probe set on local disk, with where it came from."""

    path: Path
    kind: str
    uri: str
    name: str | None = None  # registered model name (None for a plain directory)
    version: str | None = None
    aliases: list[str] = field(default_factory=list)
    tags: dict = field(default_factory=dict)
    trait: str | None = None
    fingerprint: str | None = None  # generator
    generator_fingerprint: str | None = None  # probe set
    cached: bool = False
    # generator: its backend ("builtin" | "musicgen"); probe set: the backend of the generator it was trained on
    backend: str = "builtin"
    generator_path: str | None = None  # probe set trained on MusicGen: the local folder it was trained on
    shape: tuple[int, int, int] | None = None  # (layers, heads, head dim): of the generator / the probe set

    def label(self) -> str:
        return f"{self.name} v{self.version}" if self.name else str(self.path)

    def generator_label(self) -> str:
        """How a probe set names the generator it was trained on."""
        fp = str(self.generator_fingerprint)[:12]
        if self.backend == "musicgen":
            return f"MusicGen {fp}" + (f" ({self.generator_path})" if self.generator_path else "")
        trained_on = self.tags.get(TAG + "generator_version")
        return f"generator {fp}" + (
            f" (registered generator v{trained_on})" if trained_on and trained_on != "unregistered" else ""
        )


def _shape(text) -> tuple[int, int, int] | None:
    try:
        shape = tuple(int(x) for x in str(text).split("x"))
    except (TypeError, ValueError):
        return None
    return shape if len(shape) == 3 else None


def parse_uri(uri: str) -> tuple[str, str | None, str | None]:
    m = _URI.match(uri.strip())
    if not m:
        raise RegistryError(f"not a model URI: {uri!r} (expected models:/NAME@ALIAS or models:/NAME/VERSION)")
    return m["name"], m["version"], m["alias"]


def resolve(reg: Registry, uri: str):
    """The model version a URI points at (one registry query). Raises a one-line error when the model, the version
    or the alias does not exist, or when the version is half-registered (never served)."""
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_uri(uri)
    reg.check()
    c = reg.client
    with translate_errors(reg):
        try:
            mv = c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, version)
            if PENDING in mv.tags:
                raise RegistryError(
                    f"{name} v{mv.version} is half-registered (its registration is under way or was interrupted); "
                    f"the next `smitin registry register` or `smitin registry promote {name}` removes it"
                )
            return mv
        except MlflowException as e:
            if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST" and "not found" not in str(e).lower():
                raise
        if not c.search_registered_models(f"name = '{name}'"):
            known = sorted(m.name for m in reg.registered_models(max_results=100))
            raise ModelNotFound(
                f"no registered model {name!r} in {reg.uri}"
                + (f" (registered: {', '.join(known)})" if known else " (nothing registered yet)")
            )
        if alias:
            rm = c.get_registered_model(name)
            have = ", ".join(f"{a}->v{v}" for a, v in sorted((rm.aliases or {}).items())) or "none"
            hint = f"; promote one with `smitin registry promote {name}`" if alias == CHAMPION else ""
            raise ModelNotFound(f"{name} has no version with alias '{alias}' (aliases: {have}){hint}")
        raise ModelNotFound(f"{name} has no version {version}")


def default_cache_dir(reg: Registry) -> Path:
    return Path(reg.settings.cache_dir)


def fetch(reg: Registry | None, uri: str | os.PathLike, cache_dir: str | Path | None = None) -> LocalModel:
    """A local copy of a registered version (downloaded once, verified, cached by content hash), or a plain
    directory described as is."""
    text = str(uri)
    if not text.startswith("models:/"):
        info = inspect_dir(text)
        g = info.generator_info
        shape = (
            tuple(int(info.meta[k]) for k in ("n_layers", "n_heads", "head_dim"))
            if info.kind == "probe_set" and all(k in info.meta for k in ("n_layers", "n_heads", "head_dim"))
            else None
        )
        return LocalModel(
            path=info.path,
            kind=info.kind,
            uri=text,
            trait=info.trait,
            fingerprint=info.fingerprint,
            generator_fingerprint=info.generator_fingerprint,
            backend=str(g.get("backend") or "builtin"),
            generator_path=g.get("path"),
            shape=shape,
        )
    if reg is None:
        raise RegistryError("a models:/ URI needs a registry")
    mv = resolve(reg, text)
    content = mv.tags.get(TAG + "content_hash")
    label = f"{mv.name} v{mv.version}"
    if not content:
        raise CorruptArtifact(f"{label} has no content hash: it was not registered by smitin and cannot be verified")
    cache = Path(cache_dir or default_cache_dir(reg))
    final = cache / content
    cached = True
    if (final / MANIFEST).exists():
        try:
            # every file re-hashed on every load: a cache hit is trusted no more than a download
            verify_dir(final, content, full=True, what=f"cached copy of {label} ({final})")
        except CorruptArtifact:
            shutil.rmtree(final, ignore_errors=True)  # damaged cache entry: fetch it again below
    if not (final / MANIFEST).exists():
        cached = False
        _download(reg, mv, final, content, label)
    kind = mv.tags.get(TAG + "kind") or ("generator" if (final / "generator.json").exists() else "probe_set")
    return LocalModel(
        path=final,
        kind=kind,
        uri=text,
        name=mv.name,
        version=str(mv.version),
        aliases=list(mv.aliases or []),
        tags=dict(mv.tags),
        trait=mv.tags.get(TAG + "trait"),
        fingerprint=mv.tags.get(TAG + "fingerprint"),
        generator_fingerprint=mv.tags.get(TAG + "generator_fingerprint"),
        cached=cached,
        backend=mv.tags.get(TAG + "generator_backend") or "builtin",
        generator_path=mv.tags.get(TAG + "generator_path"),
        shape=_shape(mv.tags.get(TAG + "generator_shape")),
    )


def _download(reg: Registry, mv, final: Path, content: str, label: str) -> None:
    import mlflow.artifacts

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=final.parent))
    try:
        with translate_errors(reg):
            source = reg.client.get_model_version_download_uri(mv.name, mv.version)
            try:
                local = Path(
                    mlflow.artifacts.download_artifacts(
                        artifact_uri=source, dst_path=str(tmp), tracking_uri=reg.uri, registry_uri=reg.uri
                    )
                )
            except Exception as e:  # noqa: BLE001 - missing files are a corrupt artifact, not a crash
                if "connection" in str(e).lower():
                    raise
                raise CorruptArtifact(
                    f"{label}: artifacts cannot be downloaded from {source} ({first_line(e)[:160]})"
                ) from None
        verify_dir(local, content, full=True, what=label)
        try:
            os.rename(local, final)
        except OSError:
            if not (final / MANIFEST).exists():  # not a concurrent download that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_compatible(probe_set: LocalModel, generator: LocalModel) -> None:
    """Refuse a probe set trained on another generator, naming both. A MusicGen generator whose weights are not
    loaded yet has no fingerprint: the backend and the shape (from its config.json) are checked now, the
    fingerprint once it is loaded (call again then)."""
    trained = probe_set.generator_label()
    what = "MusicGen " if generator.backend == "musicgen" else ""
    fix = "retrain the probes for this generator or pick the generator they were trained on"
    if probe_set.backend != generator.backend:
        raise IncompatibleProbeSet(
            f"probe set {probe_set.label()} (trait {probe_set.trait}) was trained on {trained}, not on the "
            f"{generator.backend} generator {generator.label()}; {fix}"
        )
    if generator.fingerprint is None:
        if probe_set.shape and generator.shape and tuple(probe_set.shape) != tuple(generator.shape):
            raise IncompatibleProbeSet(
                f"probe set {probe_set.label()} (trait {probe_set.trait}) was trained on {trained} with "
                f"layers x heads x head dim {'x'.join(map(str, probe_set.shape))}, not on {what}{generator.label()} "
                f"({'x'.join(map(str, generator.shape))}); {fix}"
            )
        return
    if probe_set.generator_fingerprint != generator.fingerprint:
        raise IncompatibleProbeSet(
            f"probe set {probe_set.label()} (trait {probe_set.trait}) was trained on {trained}, not on "
            f"{what}{generator.label()} ({str(generator.fingerprint)[:12]}); {fix}"
        )
