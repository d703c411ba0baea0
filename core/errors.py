"""User-fixable errors (bad path, bad parameter, bad input data). The `smitin` CLI prints them as one line and
exits non-zero; every package's own user errors subclass `UserError`."""


class UserError(ValueError):
    """A mistake the user can fix: printed as one line, exit code 2."""
