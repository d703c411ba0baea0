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


# Runners Beam's own lookup does not find by a short name (it knows DirectRunner, FlinkRunner, SparkRunner,
# DataflowRunner, PrismRunner ... but not the Dask runner, which lives outside its runner registry)
RUNNER_PATHS = {
    "DaskRunner": "apache_beam.runners.dask.dask_runner.DaskRunner",
    "dask": "apache_beam.runners.dask.dask_runner.DaskRunner",
}


def is_local(runner: str | None) -> bool:
    """The local FnApiRunner (the default): its pipelines keep one branch per output table, the layout every
    release so far was measured with; other runners get the one-sink layout (`write_tables`)."""
    return not runner or runner in ("FnApiRunner", "local")


def pipeline_options(runner: str | None, workers: int, beam_args: list[str] | None = None):
    from apache_beam.options.pipeline_options import PipelineOptions

    flags = list(beam_args or [])
    if not is_local(runner):
        return None, PipelineOptions(flags + [f"--runner={RUNNER_PATHS.get(runner, runner)}"])
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


class _RemotePipeline(beam.Pipeline):
    """A pipeline on another runner, waited for; the Dask runner's client is closed afterwards (Beam leaves it
    open, and it keeps reconnecting to a scheduler that has gone away)."""

    def __exit__(self, exc_type, exc_val, exc_tb):
        try:
            super().__exit__(exc_type, exc_val, exc_tb)  # runs the pipeline and waits for it
        finally:
            client = getattr(getattr(self, "result", None), "client", None)
            if client is not None and hasattr(client, "close"):
                client.close()


def make_pipeline(runner: str | None, workers: int, beam_args: list[str] | None):
    kind, options = pipeline_options(runner, workers, beam_args)
    if kind == "local":
        # Chosen explicitly: the default DirectRunner first tries to download the Prism binary.
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return _LocalPipeline(runner=FnApiRunner(), options=options)
    return _RemotePipeline(options=options)


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


# ----------------------------------------------------------------------------------------------------- one sink
# Every pipeline ends in a single transform that writes every output table. Beam's Dask runner (2.77) computes
# only the graph under the last transform it visits and gives each consumer of a multi-output ParDo all of its
# outputs, untagged: a pipeline with one branch per output table lost every branch but the last there (it wrote
# the sources table and no clips). One stream of (table, row) pairs into one grouping and one writer is
# expressible on every runner, and the local runner writes the same bytes from it.


class AsRecords(beam.DoFn):
    """Runs `inner` (a DoFn with tagged outputs) and emits what it yields as (tag, row) pairs on the main output:
    `main` for its untagged rows."""

    def __init__(self, inner: beam.DoFn, main: str):
        self.inner = inner
        self.main = main

    def setup(self):
        self.inner.setup()

    def teardown(self):
        self.inner.teardown()

    def process(self, element):
        for out in self.inner.process(element) or ():
            if isinstance(out, beam.pvalue.TaggedOutput):
                yield out.tag, out.value
            else:
                yield self.main, out


class WriteTables(beam.DoFn):
    """Writes one group: a shard of the main table (`write_shard((index, rows))`, a DoFn's process) or a whole side
    table (`write_side[tag](rows)`). Side tables are seeded with a None row so that they are written when empty."""

    def __init__(self, main: str | None, write_shard: beam.DoFn | None, write_side: dict):
        self.main = main
        self.write_shard = write_shard
        self.write_side = write_side

    def process(self, keyed):
        (tag, index), rows = keyed
        rows = [r for r in rows if r is not None]
        if tag not in self.write_side:
            yield from self.write_shard.process((index, rows))
        else:
            yield self.write_side[tag](rows)


def write_tables(
    p,
    records,
    write_side: dict,
    kept_rows=None,
    main: str | None = None,
    shard_key=None,
    write_shard: beam.DoFn | None = None,
):
    """The pipeline's one sink: (tag, row) `records`, and the kept rows of a refresh (main-table rows), grouped by
    output file and written, all under one final transform. Rows tagged `main` go to shards by `shard_key`; every
    tag in `write_side` is one whole table."""
    seeds = p | "SideTables" >> beam.Create([(tag, None) for tag in sorted(write_side)])
    parts = [records, seeds]
    if kept_rows is not None:
        parts.append(kept_rows | "KeptAsRecords" >> beam.Map(lambda r, m=main: (m, r)))
    return (
        tuple(parts)
        | "AllRecords" >> beam.Flatten()
        | "KeyByFile" >> beam.Map(lambda tr, m=main: ((tr[0], shard_key(tr[1]) if tr[0] == m else 0), tr[1]))
        | "GroupByFile" >> beam.GroupByKey()
        | "WriteTables" >> beam.ParDo(WriteTables(main, write_shard, write_side))
    )
