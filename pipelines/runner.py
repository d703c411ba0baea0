"""What every Beam pipeline of the project shares: the runner it starts (the local FnApiRunner in worker processes
unless the user names another: Flink, Spark, Dataflow, Dask ..., in which case unknown --flags go to it), and the
transform that carries a previous build's rows of unchanged sources into a refresh."""

from __future__ import annotations

import contextlib
import threading

import apache_beam as beam
import fsspec
import pyarrow.parquet as pq

_PATCH = threading.Lock()


def pipeline_options(runner: str | None, workers: int, beam_args: list[str] | None = None):
    from apache_beam.options.pipeline_options import PipelineOptions

    flags = list(beam_args or [])
    if runner and runner not in ("FnApiRunner", "local"):
        return None, PipelineOptions(flags + [f"--runner={runner}"])
    mode = "multi_processing" if workers > 1 else "in_memory"
    return "local", PipelineOptions(flags + [f"--direct_num_workers={workers}", f"--direct_running_mode={mode}"])


@contextlib.contextmanager
def loopback_only():
    """Bind the gRPC servers Beam's local runner starts for its worker processes to the loopback interface.

    Beam (2.77, fn_api_runner/worker_handlers.py) binds its control, data, state and logging servers to '[::]:0',
    every interface, with insecure channels, while its workers only ever connect to 'localhost:PORT'. grpc has no
    public setting for this, so for the duration of a local run the servers' add_insecure_port reads '[::]:N' as
    'localhost:N' (the IPv4 and IPv6 loopbacks)."""
    from grpc import _server

    with _PATCH:
        original = _server._Server.add_insecure_port

        def loopback(self, address: str) -> int:
            if address.startswith("[::]:") or address.startswith("0.0.0.0:"):
                address = "localhost:" + address.rsplit(":", 1)[1]
            return original(self, address)

        _server._Server.add_insecure_port = loopback
        try:
            yield
        finally:
            _server._Server.add_insecure_port = original


class _LocalPipeline(beam.Pipeline):
    """A pipeline on the local FnApiRunner whose run happens with its gRPC servers on the loopback."""

    def run(self, test_runner_api="AUTO"):
        with loopback_only():
            result = super().run(test_runner_api)
            result.wait_until_finish()
            return result


def make_pipeline(runner: str | None, workers: int, beam_args: list[str] | None):
    kind, options = pipeline_options(runner, workers, beam_args)
    if kind == "local":
        # Chosen explicitly: the default DirectRunner first tries to download the Prism binary.
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return _LocalPipeline(runner=FnApiRunner(), options=options)
    return beam.Pipeline(options=options)


class ReadKeptRows(beam.DoFn):
    """Rows of the previous build whose source is unchanged (refresh): read back, not recomputed."""

    def __init__(self, kept_paths: list[str]):
        self.kept_paths = kept_paths

    def process(self, shard_path: str):
        keep = set(self.kept_paths)
        with fsspec.open(shard_path, "rb") as f:
            pf = pq.ParquetFile(f)
            for i in range(pf.num_row_groups):
                for row in pf.read_row_group(i).to_pylist():
                    if row["source_path"] in keep:
                        yield row
