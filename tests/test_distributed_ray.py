"""`qwen2vl generate --ray`: a local Ray cluster on this machine, the tiny checkpoint, one ray.init."""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

from qwen2vl.batch_job import Progress  # noqa: E402
from qwen2vl.cli import main  # noqa: E402

GREEDY = ["--temperature", "0", "--max-tokens", "6"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def cluster():
    # Logical CPUs: two single-threaded replicas and the prepare tasks beside them.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    yield
    ray.shutdown()


def _png(path, seed: int, size=(56, 42)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


def _video(path):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 56, 56, "yuv420p"
        for index in range(4):
            pixels = np.full((56, 56, 3), index * 60, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return str(path)


def _user(*parts):
    return [{"role": "user", "content": list(parts)}]


@pytest.fixture(scope="module")
def job(tiny_ckpt, tmp_path_factory):
    """64 conversations (text, images, one by a path relative to the file, a data URI, a video,
    two broken images) and a line without an id, and the single-process answers to them."""
    folder = tmp_path_factory.mktemp("ray-job")
    images = [_png(folder / f"{i}.png", i) for i in range(4)]
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    data_uri = "data:image/png;base64," + base64.b64encode((folder / "0.png").read_bytes()).decode()
    conversations = []
    for i in range(64):
        if i == 5:
            messages = _user({"type": "video", "video": _video(folder / "clip.mp4")}, {"type": "text", "text": "What?"})
        elif i in (17, 40):
            broken = str(folder / ("corrupt.png" if i == 17 else "missing.png"))
            messages = _user({"type": "image", "image": broken}, {"type": "text", "text": "Describe."})
        elif i == 23:
            messages = _user({"type": "image", "image": data_uri}, {"type": "text", "text": "And this?"})
        elif i % 3 == 0:
            image = "1.png" if i == 9 else images[i % 4]  # relative to in.jsonl's folder, not the test's
            messages = _user({"type": "image", "image": image}, {"type": "text", "text": f"Image {i}?"})
        else:
            messages = [{"role": "user", "content": f"Say something about {i}."}]
        conversations.append({"id": f"row-{i}", "messages": messages})
    source = folder / "in.jsonl"
    no_id = _user({"type": "text", "text": "Who am I?"})
    source.write_text("".join(json.dumps(c) + "\n" for c in conversations) + json.dumps(no_id) + "\n")
    expected_path = folder / "single.jsonl"
    assert main(["generate", "--model", str(tiny_ckpt), "--input", str(source), "--output", str(expected_path),
                 "--batch-size", "8", *GREEDY]) == 1
    expected = {row["id"]: row for row in map(json.loads, expected_path.read_text().splitlines())}
    assert len(expected) == 65 and sorted(i for i, r in expected.items() if "error" in r) == ["65", "row-17", "row-40"]
    assert expected["65"]["error"]["message"].startswith("the row has no 'id'")
    return source, expected


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _ray_generate(tiny_ckpt, source, target, *extra, replicas: int = 2) -> int:
    return main(["generate", "--ray", "--num-replicas", str(replicas), "--model", str(tiny_ckpt), "--input",
                 str(source), "--output", str(target), "--batch-size", "8", *GREEDY, *extra])


def test_two_replicas_answer_as_one_process(tiny_ckpt, job, tmp_path, capsys):
    source, expected = job
    target = tmp_path / "out.jsonl"
    assert _ray_generate(tiny_ckpt, source, target) == 1  # three rows failed
    rows = _rows(target)
    assert len(rows) == 65 and {row["id"]: row for row in rows} == expected
    assert expected["row-17"]["error"]["type"] == "MediaError"
    assert "corrupt.png" in expected["row-17"]["error"]["message"]
    assert "missing.png" in expected["row-40"]["error"]["message"]
    err = capsys.readouterr().err
    assert "65 rows" in err and "3 failed" in err and "rows/s" in err and "2 replica(s)" in err


class _KillOneReplica(Progress):
    """Kills a replica's process (as an OOM kill or a lost node would) once the first rows are in,
    while it has batches in flight: the one that answered them (the other may still be loading)."""

    def __init__(self):
        super().__init__(None)
        self.killed = self.rows_then = None

    def add(self, row):
        super().add(row)
        if self.killed is None and self.rows >= 8:
            replicas = [actor for actor in ray._private.state.actors().values()
                        if actor["State"] == "ALIVE" and "_Replica" in actor["ActorClassName"]]
            self.killed, self.rows_then = replicas[0]["Pid"], self.rows
            os.kill(self.killed, signal.SIGKILL)


def test_a_replica_killed_mid_run_loses_and_repeats_nothing(tiny_ckpt, job, tmp_path):
    from qwen2vl.distributed import run_job
    from qwen2vl.engine_args import EngineArgs
    from qwen2vl.sampling_params import SamplingParams

    source, expected = job
    target = tmp_path / "out.jsonl"
    progress = run_job(str(source), str(target), engine_args=EngineArgs(model=str(tiny_ckpt)),
                       params=SamplingParams(temperature=0, max_tokens=6), num_replicas=2, batch_size=4,
                       progress=_KillOneReplica())
    assert progress.killed is not None and progress.rows_then < 65
    rows = _rows(target)
    assert len(rows) == 65 and {row["id"]: row for row in rows} == expected


def test_resume_answers_only_the_missing_rows(tiny_ckpt, job, tmp_path):
    """A job stopped after 20 rows (the 21st cut short) plus --resume: each id once, the 20 kept."""
    source, expected = job
    target = tmp_path / "out.jsonl"
    lines = [json.dumps(row) for row in list(expected.values())[:21]]
    (tmp_path / "out.jsonl.partial").write_text("\n".join(lines[:20]) + "\n" + lines[20][:15])
    assert _ray_generate(tiny_ckpt, source, target, "--resume") == 1
    text = target.read_text().splitlines()
    assert text[:20] == lines[:20]
    rows = [json.loads(line) for line in text]
    assert len(rows) == 65 and {row["id"]: row for row in rows} == expected


def test_parquet_with_a_bytes_column(tiny_ckpt, job, tmp_path):
    """Parquet in (media as a binary column, messages as JSON text) and out, as `generate_dataset` writes it."""
    import pyarrow as pa

    _, expected = job
    image = _png(tmp_path / "p.png", 1)
    with open(image, "rb") as file:
        png = file.read()
    messages = json.dumps(_user({"type": "image", "image": {"column": "jpeg"}}, {"type": "text", "text": "Image 9?"}))
    table = pa.table({"id": [1, 2], "messages": [messages, messages], "jpeg": [png, b"broken"]})
    source, target = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(table, source)
    assert _ray_generate(tiny_ckpt, source, target, replicas=1) == 1
    rows = {row["id"]: row for row in pq.read_table(target).to_pylist()}
    assert rows[1]["text"] == expected["row-9"]["text"] and rows[1]["error"] is None
    assert rows[2]["error"]["type"] == "MediaError" and rows[2]["text"] is None


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_ray_output_is_quiet_unless_verbose(tiny_ckpt, tmp_path, verbose):
    """A job in a process of its own (its own local cluster), its standard error as a log holds
    it: by default the job's own lines only, no Ray Data progress or INFO blocks, warnings, or
    core worker lines; --verbose shows Ray's."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"id": i, "messages": _user({"type": "text", "text": f"hi {i}"})}) + "\n"
                              for i in range(2)))
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "qwen2vl.cli", "generate", "--ray", "--model", str(tiny_ckpt), "--input",
               str(source), "--output", str(target), *GREEDY, *(["--verbose"] if verbose else [])]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert [row["id"] for row in _rows(target)] in ([0, 1], [1, 0])
    loading, *ray_lines, summary = out.stderr.splitlines()
    assert loading == f"qwen2vl: loading {tiny_ckpt}"
    assert summary.startswith("[2 rows, ") and summary.endswith(", 1 replica(s)]")
    if verbose:
        assert any("INFO" in line and "Dataset" in line for line in ray_lines), out.stderr
        assert any("core_worker" in line for line in ray_lines), out.stderr
    else:
        # The one line Ray's C++ logging writes when its level is set from the environment, at any level.
        assert len(ray_lines) <= 1 and "\r" not in out.stderr, out.stderr
        assert all(line.endswith("Set ray log level from environment variable RAY_BACKEND_LOG_LEVEL to 3")
                   for line in ray_lines), out.stderr
