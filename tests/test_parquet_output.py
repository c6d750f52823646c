"""`generate --ray`'s Parquet output loses no row: every batch written is a closed file of its own,
so a job killed at any moment (here: left without `commit` or `close`, with a half-written batch
beside) resumes with every batch it wrote."""
from __future__ import annotations

import pytest

pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from qwen2vl.distributed.ray_batch import OUTPUT_FIELDS, ParquetOutput  # noqa: E402
from qwen2vl.errors import InputError  # noqa: E402

SCHEMA = pa.schema([("id", pa.int64()), *OUTPUT_FIELDS])


def _rows(first: int, count: int) -> list[dict]:
    return [{"id": i, "text": f"answer {i}", "finish_reason": "stop",
             "usage": {"prompt_tokens": 3, "completion_tokens": 2}, "error": None} for i in range(first, first + count)]


def _started(path, resume: bool = False) -> ParquetOutput:
    output = ParquetOutput(path, resume=resume)
    output.schema = SCHEMA  # as the job sets it from the first answered batch
    return output


def test_a_killed_job_keeps_every_batch_it_wrote_and_resumes(tmp_path):
    path = tmp_path / "out.parquet"
    killed = _started(path)
    for first in (0, 4, 8):
        killed.write(_rows(first, 4))
    # killed here: no commit, no close, and a batch cut short while it was written
    (killed.partial / ".part-000003.parquet").write_bytes(b"PAR1 cut short")
    assert not path.exists()

    resumed = _started(path, resume=True)
    assert resumed.done == {str(i) for i in range(12)}
    resumed.write(_rows(12, 4))
    resumed.commit()
    assert pq.read_table(path).to_pylist() == _rows(0, 16)
    assert not resumed.partial.exists()


def test_resuming_a_finished_output_keeps_its_rows_first(tmp_path):
    path = tmp_path / "out.parquet"
    pq.write_table(pa.Table.from_pylist(_rows(0, 5), schema=SCHEMA), path)
    resumed = _started(path, resume=True)
    assert resumed.done == {str(i) for i in range(5)}
    assert [part.name for part in resumed.partial.iterdir()] == ["part-000000.parquet"]  # PATH as it was stays whole
    resumed.write(_rows(5, 2))
    resumed.commit()
    assert pq.read_table(path).to_pylist() == _rows(0, 7)


def test_without_resume_an_earlier_partial_output_is_started_over(tmp_path):
    path = tmp_path / "out.parquet"
    _started(path).write(_rows(0, 3))
    fresh = _started(path)
    assert fresh.done == set() and list(fresh.partial.iterdir()) == []
    fresh.write(_rows(10, 2))
    fresh.commit()
    assert pq.read_table(path).to_pylist() == _rows(10, 2)


def test_a_job_with_no_rows_writes_an_empty_table_and_close_tidies_up(tmp_path):
    path = tmp_path / "out.parquet"
    output = _started(path)
    output.commit()
    assert pq.read_table(path).num_rows == 0 and not output.partial.exists()
    stopped = _started(tmp_path / "other.parquet")
    stopped.close()  # stopped before any row: nothing left behind
    assert not stopped.partial.exists()


def test_a_partial_file_that_cannot_be_read_is_a_clear_error(tmp_path):
    """A single `.partial` file, as earlier versions wrote, cut short by a kill: no footer."""
    path = tmp_path / "out.parquet"
    (tmp_path / "out.parquet.partial").write_bytes(b"PAR1 no footer")
    with pytest.raises(InputError, match="out.parquet.partial is not a readable Parquet file") as caught:
        ParquetOutput(path, resume=True)
    assert caught.value.field == "output"
