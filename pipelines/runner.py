"""The Beam runner every pipeline of the project starts: the local FnApiRunner in worker processes unless the user
names another (Flink, Spark, Dataflow, Dask ...), in which case unknown --flags go to it."""
from __future__ import annotations

import apache_beam as beam


def pipeline_options(runner: str | None, workers: int, beam_args: list[str] | None = None):
    from apache_beam.options.pipeline_options import PipelineOptions

    flags = list(beam_args or [])
    if runner and runner not in ("FnApiRunner", "local"):
        return None, PipelineOptions(flags + [f"--runner={runner}"])
    mode = "multi_processing" if workers > 1 else "in_memory"
    return "local", PipelineOptions(flags + [f"--direct_num_workers={workers}", f"--direct_running_mode={mode}"])


def make_pipeline(runner: str | None, workers: int, beam_args: list[str] | None):
    kind, options = pipeline_options(runner, workers, beam_args)
    if kind == "local":
        # Chosen explicitly: the default DirectRunner first tries to download the Prism binary.
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return beam.Pipeline(runner=FnApiRunner(), options=options)
    return beam.Pipeline(options=options)
