"""Batch inference over a Ray cluster (`pip install 'qwen2vl[ray]'`): the only module that imports ray.

Pipeline (Ray Data, streaming, so memory stays bounded whatever the dataset's size):

1. read: JSONL (one conversation per line, as `qwen2vl generate` reads) or Parquet (columns `id`,
   `messages` as a list or its JSON text, optional binary media columns), local paths or any
   pyarrow filesystem URI (s3://, gs://, ...);
2. prepare, in Ray tasks: media fetched, decoded and resized (uint8: the vision tower patchifies), the
   prompt tokenized and fitted to `--max-model-len`
   (`qwen2vl.batch_job.prepare_row`), so a model replica never waits on JPEG decoding; a bad row
   carries its error from here on;
3. answer, in an actor pool of `num_replicas` engines (one `Qwen2VL` each, its continuous batcher
   inside; one GPU each on a GPU cluster, `cpus_per_replica` CPUs and PyTorch threads each
   without): `qwen2vl.batch_job.answer_rows`, the loop `qwen2vl generate` runs in one process;
4. write (the CLI): the driver streams the rows into `JobOutput` (or Parquet), answering each id once.

Exactly once: Ray Data's actor pool restarts a replica that dies, however often
(`max_restarts=-1`), and reruns its unfinished batches (`max_task_retries=-1`); a prepare task
that dies with its worker is rerun (Ray's task `max_retries`, 3). These are Ray Data's defaults
for `map_batches`, kept on purpose (tests/test_distributed_ray.py kills a replica mid-run). A
batch's rows reach the output only when the batch is done, and the driver drops an id it has
already written. `--resume` skips the ids already in the output.
"""
from __future__ import annotations

import base64
import functools
import io
import json
import logging
import os
import pickle
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.datasource import FileBasedDatasource

from ..batch_job import (JobOutput, Progress, answer_rows, conversation_row, id_key, named_by_line, prepare_row,
                         write_rows)
from ..engine_args import EngineArgs
from ..errors import InputError, Qwen2VLError
from ..jsonl import JSON_SPACE, jsonl_lines, utf8_text
from ..progress import note
from ..sampling_params import SamplingParams

# CPUs a read or prepare task asks for: half a core, as decoding waits on reads part of the time;
# and a request unlike the replicas' keeps Ray Data from fusing preparation into the replicas,
# where decoding would stall the engine.
PREPARE_CPUS = 0.5
# Rows of a JSONL file per block read (about as many as a prepare task takes at once).
ROWS_PER_BLOCK = 1024

OUTPUT_FIELDS = [
    ("text", pa.string()),
    ("finish_reason", pa.string()),
    ("usage", pa.struct([("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64())])),
    ("error", pa.struct([("type", pa.string()), ("message", pa.string())])),
]


def check_input(path: str) -> None:
    if "://" not in path and not Path(path).exists():
        raise InputError(f"--input {path}: no such file or folder", field="input")


def read_dataset(path: str) -> "ray.data.Dataset":
    """`path` (a file, a folder of them, or a URI): Parquet if it ends in .parquet, else JSONL,
    read as `qwen2vl generate` reads it (`_JsonlDatasource`)."""
    check_input(path)
    if path.rstrip("/").endswith(".parquet"):
        return ray.data.read_parquet(path)
    local = "://" not in path
    # A local path absolute here: its media paths are joined onto its folder on other machines.
    return ray.data.read_datasource(_JsonlDatasource(os.path.abspath(path) if local else path, local=local),
                                    num_cpus=PREPARE_CPUS)


class _JsonlDatasource(FileBasedDatasource):
    """JSONL files as rows `id`, `messages` (its JSON text) and `error` (a row that cannot run:
    its message), by `batch_job.conversation_row`, the rule of `generate` without --ray. One
    task reads a file whole, so its lines are numbered; a local file's relative media paths are
    joined onto its folder. A line that is not a conversation is an error row, not a failed job."""

    def __init__(self, paths, local: bool, **options):
        super().__init__(paths, **options)
        self.local = local

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        folder = Path(path).absolute().parent if self.local else None
        rows = []
        for number, line, _ in jsonl_lines(io.BytesIO(f.readall())):
            if line.strip(JSON_SPACE.encode()):
                rows.append(_jsonl_row(line, number, f"{path}: line {number}", folder))
            if len(rows) == ROWS_PER_BLOCK:
                yield _jsonl_table(rows)
                rows = []
        if rows:
            yield _jsonl_table(rows)


def _jsonl_row(line: bytes, number: int, where: str, folder: Path | None) -> dict:
    try:
        text = utf8_text(line, where)
        record = json.loads(text.removeprefix("\ufeff") if number == 1 else text)
        return conversation_row(record, number, folder)
    except InputError as error:  # not UTF-8, or not a conversation
        problem = error
    except json.JSONDecodeError as error:
        problem = InputError(f"not JSON ({error.msg} at column {error.colno})")
    except (ValueError, RecursionError) as error:  # a number over Python's digit limit; nesting too deep
        problem = InputError(f"not JSON this reader takes ({error})")
    return {"id": None, "line": number, "error": problem}


def _jsonl_table(rows: list[dict]) -> pa.Table:
    named_by_line(rows)
    return pa.table({"id": [row["id"] for row in rows],
                     "messages": [json.dumps(row["messages"]) if "messages" in row else None for row in rows],
                     "error": pa.array([str(row["error"]) if "error" in row else None for row in rows], pa.string())})


@functools.lru_cache(maxsize=4)
def _processor(engine_args: EngineArgs):
    """One processor per worker process and checkpoint (tokenizer and template read once)."""
    import torch

    from ..hub import resolve_model_dir
    from ..processor import Processor

    torch.set_num_threads(1)  # the parallelism is the pool of prepare tasks; threads would contend with it

    return Processor.from_pretrained(resolve_model_dir(engine_args.model), min_pixels=engine_args.min_pixels,
                                     max_pixels=engine_args.max_pixels)


def _prepare_batch(batch: pa.Table, engine_args: EngineArgs) -> pa.Table:
    processor = _processor(engine_args)
    rows = batch.to_pylist()
    prompts = [pickle.dumps(_prepared(processor, row, engine_args.max_model_len)) for row in rows]
    return pa.table({"id": batch.column("id"), "prompt": pa.array(prompts, pa.binary())})


def _prepared(processor, row: dict, context_len: int | None):
    if row.get("error") is not None:  # found while reading the line
        return InputError(row["error"])
    if row.get("id") is None:  # a Parquet row (a JSONL line without an id is numbered)
        return InputError("the row has no 'id'; every row needs one, unique in the input", field="id")
    try:
        messages = _messages_of(row)
    except InputError as error:
        return error
    return prepare_row(processor, messages, context_len)


def _messages_of(row: dict):
    """The row's messages as the processor takes them: parsed from JSON text, Arrow's nulls of
    absent struct fields dropped, `{"column": NAME}` media replaced by that binary column's bytes."""
    messages = row.get("messages")
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as error:
            raise InputError(f"not a JSON conversation ({error.msg} at column {error.colno})") from None
        if not isinstance(messages, list):
            raise InputError("expected a list of messages or an object with 'messages'")
        return _with_column_media(messages, row)
    return _with_column_media(_without_nulls(messages), row)


def _without_nulls(value):
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _with_column_media(messages: list, row: dict) -> list:
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            for kind in ("image", "video"):
                value = part.get(kind) if isinstance(part, dict) else None
                if isinstance(value, dict) and "column" in value:
                    data = row.get(value["column"])
                    if not isinstance(data, bytes):
                        raise InputError(f"{kind} column {value['column']!r}: the row has no bytes there")
                    part[kind] = "data:;base64," + base64.b64encode(data).decode()
    return messages


class _Replica:
    """One engine in the actor pool: answers prepared rows with `answer_rows`."""

    def __init__(self, engine_args: EngineArgs, params: SamplingParams, threads: int | None):
        import torch

        from ..api import Qwen2VL

        if threads:
            torch.set_num_threads(threads)  # else every replica starts a thread per core and they contend
        self.llm = Qwen2VL.from_pretrained(args=engine_args)
        self.params = params

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [{"id": row["id"], "prompt": pickle.loads(row["prompt"])} for row in batch.to_pylist()]
        answers = list(answer_rows(self.llm, rows, self.params, batch_size=len(rows)))
        schema = pa.schema([batch.schema.field("id"), *OUTPUT_FIELDS])
        return pa.Table.from_pylist(answers, schema=schema)


def generate_dataset(ds: "ray.data.Dataset", model: str | os.PathLike | None = None, *, num_replicas: int = 1,
                     cpus_per_replica: int = 1, gpus_per_replica: int | None = None, batch_size: int = 64,
                     prepare_tasks: int | None = None,
                     engine_args: EngineArgs | None = None, params: SamplingParams | None = None,
                     **overrides) -> "ray.data.Dataset":
    """Answer every row of `ds` (columns `id`, `messages`; optional binary media columns a part
    names as `{"type": "image", "image": {"column": NAME}}`): a dataset of `id`, `text`,
    `finish_reason`, `usage` (a struct) and `error` (`type`, `message`; set for a row that
    could not run, the rest then null). Lazy, as Ray datasets are.

    Media are decoded and prompts prepared in at most `prepare_tasks` Ray tasks at a time
    (default: two per replica, one batch ready while a replica answers another), half a CPU each.
    `model` or `engine_args` choose the checkpoint and engine; keyword overrides are
    `SamplingParams` fields. `gpus_per_replica` defaults to 1 where the cluster has GPUs and the
    device is not "cpu", else 0 (then `cpus_per_replica` CPUs and PyTorch threads each).
    """
    if engine_args is None:
        engine_args = EngineArgs(model=model)
    elif model is not None:
        raise TypeError("give either model or engine_args, not both")
    params = SamplingParams.from_overrides(params, **overrides)
    params.validate()  # a bad setting fails here, not once per row in every replica
    if gpus_per_replica is None:
        gpus_per_replica = 1 if ray.cluster_resources().get("GPU", 0) >= 1 and engine_args.device != "cpu" else 0
    for name, value in (("num_replicas", num_replicas), ("cpus_per_replica", cpus_per_replica),
                        ("batch_size", batch_size)):
        if not (isinstance(value, int) and value >= 1):
            raise InputError(f"{name}={value!r} is invalid: expected an integer >= 1", field=name)
    prepared = ds.map_batches(_prepare_batch, batch_format="pyarrow", batch_size=batch_size,
                              fn_kwargs={"engine_args": engine_args}, num_cpus=PREPARE_CPUS,
                              compute=ray.data.TaskPoolStrategy(size=prepare_tasks or 2 * num_replicas))
    resources = {"num_gpus": gpus_per_replica} if gpus_per_replica else {"num_cpus": cpus_per_replica}
    return prepared.map_batches(
        _Replica, batch_format="pyarrow", batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=num_replicas),
        fn_constructor_kwargs={"engine_args": engine_args, "params": params,
                               "threads": None if gpus_per_replica else cpus_per_replica},
        **resources)


class ParquetOutput:
    """`JobOutput` for a .parquet file. `PATH.partial` is a folder: each batch of rows becomes a
    closed Parquet file of its own there (written under a hidden name, then renamed), so a job
    killed at any moment leaves every batch it wrote readable; `commit` writes them as one table
    onto PATH (by way of a new file renamed into place) and removes the folder. `resume` goes on
    from `PATH.partial` (else from PATH, whose rows become the folder's first part) and `done`
    holds the ids already answered; without it an earlier `PATH.partial` is started over."""

    def __init__(self, path: str | os.PathLike, resume: bool = False):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        if not self.path.parent.is_dir():
            raise InputError(f"--output {self.path}: folder {self.path.parent} does not exist", field="output")
        self.schema: pa.Schema | None = None  # the answered rows' (set by the job), for a file without kept rows
        if not resume:
            _remove(self.partial)
        elif not self.partial.is_dir():
            kept = _read_parquet(self.partial if self.partial.is_file() else self.path)
            _remove(self.partial)
            self.partial.mkdir()
            if kept is not None:
                self._write_part(kept)
        self.partial.mkdir(exist_ok=True)
        parts = self._parts()
        self._file_schema = pq.read_schema(parts[0]) if parts else None
        self.done = {id_key(row_id) for part in parts for row_id in pq.read_table(part, columns=["id"]).column("id").to_pylist()}

    def _parts(self) -> list[Path]:
        return sorted(self.partial.glob("part-*.parquet"))

    def _write_part(self, table: pa.Table) -> None:
        final = self.partial / f"part-{len(self._parts()):06d}.parquet"
        hidden = self.partial / f".{final.name}"  # a dataset reader passes over hidden names
        pq.write_table(table, hidden)
        os.replace(hidden, final)

    def write(self, rows: list[dict]) -> None:
        if self._file_schema is None:
            self._file_schema = self.schema
        self._write_part(pa.Table.from_pylist(rows, schema=self._file_schema))

    def commit(self) -> None:
        parts = self._parts()
        if parts:
            table = pa.concat_tables(pq.read_table(part) for part in parts)
        else:  # no rows at all
            table = pa.schema([("id", pa.string()), *OUTPUT_FIELDS]).empty_table()
        new = self.path.with_name(self.path.name + ".new")
        pq.write_table(table, new)
        os.replace(new, self.path)
        _remove(self.partial)

    def close(self) -> None:
        if self.partial.is_dir() and self._parts():
            note(f"[the rows written so far are in {self.partial}; --resume goes on from there]")
        elif self.partial.is_dir():
            _remove(self.partial)


def _read_parquet(path: Path) -> pa.Table | None:
    """The rows of a finished Parquet output (None: no file). One cut short by a kill has no
    footer and cannot be read: an error that says so."""
    if not path.is_file():
        return None
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise InputError(f"--resume: {path} is not a readable Parquet file ({error}); remove it to start over",
                         field="output") from None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def run_job(input_path: str, output_path: str | None, *, engine_args: EngineArgs, params: SamplingParams,
            num_replicas: int = 1, cpus_per_replica: int = 1, batch_size: int = 64, resume: bool = False,
            progress: Progress | None = None) -> Progress:
    """Read `input_path`, answer every row not yet in `output_path` (with `resume`), write each
    id once (standard output without `output_path`); the job's `Progress` for its summary."""
    parquet = output_path is not None and output_path.endswith(".parquet")
    output = None if output_path is None else (ParquetOutput if parquet else JobOutput)(output_path, resume=resume)
    progress = progress or Progress(None)
    try:
        ds = read_dataset(input_path)
        if output is not None and output.done:
            done = output.done
            ds = ds.filter(lambda row: row["id"] is None or id_key(row["id"]) not in done)
        answered = generate_dataset(ds, engine_args=engine_args, params=params, num_replicas=num_replicas,
                                    cpus_per_replica=cpus_per_replica, batch_size=batch_size)
        write_rows(output, _fresh_rows(answered, output), progress)
    finally:
        if output is not None:
            output.close()
    return progress


def _fresh_rows(answered: "ray.data.Dataset", output) -> Iterator[list[dict]]:
    """The answered rows, a batch at a time, each id once (a rerun batch may answer one again)."""
    seen = set(output.done) if output is not None else set()
    for batch in answered.iter_batches(batch_format="pyarrow", batch_size=None):
        if isinstance(output, ParquetOutput):
            output.schema = batch.schema
        yield [row for row in map(_row, batch.to_pylist()) if row["id"] is None or _first(row["id"], seen)]


def _row(row: dict) -> dict:
    """A dataset row as `qwen2vl generate` writes it: the fields of an answer, or of an error."""
    if row.get("error") is not None:
        return {"id": row["id"], "error": row["error"]}
    return {key: value for key, value in row.items() if key != "error"}


def _first(row_id, seen: set) -> bool:
    key = id_key(row_id)
    if key in seen:
        return False
    seen.add(key)
    return True


def init_cluster(address: str | None, num_replicas: int, cpus_per_replica: int, verbose: bool = False) -> None:
    """Join the cluster at `address` ("auto", "ray://HOST:10001"; default $RAY_ADDRESS), else
    start one on this machine with room for the replicas and a prepare task beside them. Unless
    `verbose`, Ray's logs on this driver are errors only, the workers' output stays in their log
    files (`log_to_driver`), and the C++ core worker's stderr lines (`core_worker.cc ... E`) are
    at its fatal level (RAY_BACKEND_LOG_LEVEL, unless set; Ray then writes one line saying so)."""
    if ray.is_initialized():
        return
    if not verbose:
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    address = address or os.environ.get("RAY_ADDRESS")
    logs = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    if address:
        ray.init(address=address, **logs)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, num_replicas * cpus_per_replica + 1), include_dashboard=False,
                 **logs)


def quiet_ray_data(verbose: bool) -> None:
    """Unless `verbose`, none of Ray Data's own output on this driver but errors (the job's
    progress line is ours): its progress bars (or, off a terminal, its progress logged every few
    seconds) and execution plans off, its console log at ERROR (its log file in the session
    folder keeps everything), and Ray's UserWarnings (a filter's speed, a pool larger than its
    input) ignored."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = verbose
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":  # Ray Data's default logging config (RAY_DATA_LOGGING_CONFIG unset)
            handler.setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        warnings.filterwarnings("ignore", category=UserWarning, module=r"ray(\.|$)")


def run_cli_job(args, engine_args: EngineArgs, params: SamplingParams) -> int:
    """`qwen2vl generate --ray`: exit status 0, or 1 when some rows are error rows."""
    num_replicas = args.num_replicas or 1
    check_input(args.input)  # before Ray starts (seconds)
    quiet_ray_data(args.verbose)
    try:
        init_cluster(args.ray_address, num_replicas, args.cpus_per_replica, verbose=args.verbose)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise Qwen2VLError(f"--ray-address {args.ray_address}: cannot join the Ray cluster ({error})") from None
    progress = run_job(args.input, args.output, engine_args=engine_args, params=params,
                       num_replicas=num_replicas, cpus_per_replica=args.cpus_per_replica,
                       batch_size=args.batch_size, resume=args.resume)
    progress.finish(f", {num_replicas} replica(s)")
    return 1 if progress.failed else 0
