"""Thin generation front door: `generate(...)` / `GenerationSession` (generation.session) and the `smitin` CLI.
Imports are lazy so `smitin --help` stays fast."""


def __getattr__(name):
    if name in ("generate", "GenerationSession", "GenerationResult", "GenerationError"):
        from generation import session

        return getattr(session, name)
    raise AttributeError(f"module 'generation' has no attribute {name!r}")
