"""Registry errors a user can cause or fix. Each is printed by the `smitin` CLI as one line."""

from __future__ import annotations

from core.errors import UserError


class RegistryError(UserError):
    """Anything wrong with the registry that the user can act on."""


class RegistryUnavailable(RegistryError):
    """The tracking server / database cannot be reached."""


class ModelNotFound(RegistryError):
    """No registered model, version or alias by that name."""


class CorruptArtifact(RegistryError):
    """Downloaded or cached files do not match the checksums recorded at registration."""


class InvalidArtifact(RegistryError):
    """A directory offered for registration is not a generator / probe set."""


class IncompatibleProbeSet(RegistryError):
    """A probe set trained on another generator than the one it would steer."""


class PromotionRefused(RegistryError):
    """A promotion gate failed (the message names it)."""


class RegistrationBusy(RegistryError):
    """Another registration holds the registry lock."""
