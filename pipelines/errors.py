"""The data pipelines' user errors: `core.errors.UserError` under the name the pipelines have always used."""

from core.errors import UserError

# The data pipelines' own name for it.
PipelineUserError = UserError

__all__ = ["UserError", "PipelineUserError"]
