"""User-fixable errors (bad path, bad parameter, bad input data). The `smitin` CLI prints them as one line and
exits non-zero; every package's own user errors subclass `UserError` (pipelines is the lowest layer, so all
others may import it)."""


class UserError(ValueError):
    """A mistake the user can fix: printed as one line, exit code 2."""


# The data pipelines' own name for it.
PipelineUserError = UserError
