"""Which generator a command runs on, and loading it: the builtin generator (a trained folder) or Hugging Face
MusicGen (local weights). The params `generator` section (`read_generator_params`) with a command's overrides
gives a `GeneratorChoice` (`choose_backend`); `load_backend` turns a choice into (generator, codec).
`smitin generate` (generation.session), `smitin probes train` and `smitin evaluate-steering` (models.steering_cli)
all choose and load here. MusicGen itself is imported only when a folder has to be looked at."""

from __future__ import annotations

from pathlib import Path

from core.config import load_section
from core.errors import UserError
from models.generation_params import GeneratorChoice, GeneratorParams


def read_generator_params(params_path: str | Path | None = "params.yaml") -> GeneratorParams:
    """params.yaml `generator`; no file: the builtin generator."""
    if params_path and Path(params_path).is_file():
        return load_section(GeneratorParams, params_path, "generator")
    return GeneratorParams()


def choose_backend(
    params: GeneratorParams | None = None,
    *,
    generator: str | Path | None = None,
    generator_decides: bool = False,
    backend: str | None = None,
    musicgen: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    allow_pickle_weights: bool | None = None,
) -> GeneratorChoice:
    """The params `generator` section with a command's overrides applied (None keeps the params value):
    - `backend`: builtin | musicgen, wins over everything;
    - `musicgen`: a local MusicGen folder; implies backend musicgen;
    - `generator`: a MusicGen folder (detected from its config.json) counts as `musicgen`; a builtin generator's
      folder becomes `builtin_dir` (a models:/ URI does not). By default a builtin folder does not override params
      `backend: musicgen`, so the DVC stages, which always pass --generator data/generator, follow params. With
      `generator_decides` (a command without a default generator, so the user named this one) a generator that is
      not a MusicGen folder means the builtin backend, and asking for MusicGen with it is an error."""
    from models.musicgen import MusicGenError, find_musicgen_dir

    params = params or GeneratorParams()
    builtin_dir = None
    if generator is not None:
        uri = str(generator).startswith("models:/")
        if not uri and find_musicgen_dir(generator) is not None:
            musicgen = generator if musicgen is None else musicgen
        else:
            builtin_dir = None if uri else str(generator)
            if generator_decides and musicgen is None:
                if backend == "musicgen":
                    raise MusicGenError(
                        f"--generator {generator} is not a MusicGen folder (MusicGen weights are never "
                        "registered: give their local folder)"
                    )
                backend = "builtin"
    over: dict = {}
    if musicgen is not None:
        over.update(path=str(musicgen), backend="musicgen")
    if backend is not None:
        over["backend"] = backend
    if device is not None:
        over["device"] = device
    if dtype is not None:
        over["dtype"] = dtype
    if allow_pickle_weights:
        over["allow_pickle_weights"] = True
    return GeneratorChoice.parse({**params.model_dump(), **over, "builtin_dir": builtin_dir}, "generator")


def musicgen_folder(choice: GeneratorParams) -> Path:
    """The folder holding the chosen MusicGen checkpoint's config.json (its `path` may be a hub cache folder)."""
    from models.musicgen import MusicGenError, resolve_local_dir

    if not choice.path:
        raise MusicGenError(
            "generator.backend is musicgen but no MusicGen folder is given (--musicgen DIR, --generator DIR or "
            "params generator.path)"
        )
    return resolve_local_dir(choice.path)


def load_backend(choice: GeneratorParams, builtin_dir: str | Path | None = None):
    """(generator, codec) of a chosen backend: `musicgen` loads the local weights at `path` on `device` in `dtype`
    (nothing is downloaded); `builtin` loads the trained generator in `builtin_dir` (default: the choice's own)."""
    if choice.backend == "musicgen":
        from models.musicgen import MusicGenError, load_musicgen

        generator, codec = load_musicgen(
            musicgen_folder(choice), choice.device, choice.dtype, choice.codec_path, choice.allow_pickle_weights
        )
        if codec is None:
            raise MusicGenError(
                "this decoder-only MusicGen has no codec: set generator.codec_path to an EnCodec save_pretrained folder"
            )
        return generator, codec
    from models.generator import load_generator

    builtin_dir = builtin_dir or (choice.builtin_dir if isinstance(choice, GeneratorChoice) else None)
    if builtin_dir is None:
        raise UserError("the builtin generator backend needs the trained generator's folder")
    return load_generator(builtin_dir)
