"""Errors a user can cause in the data pipelines (bad input path, bad params): printed as one line."""


class PipelineUserError(ValueError):
    pass
