"""`qwen2vl generate` and `eval` as a log sees them (plain lines, one summary) and a terminal
(one line redrawn); the rows of a job: ids, media paths relative to the file, standard input
and output."""
from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from qwen2vl import Qwen2VL
from qwen2vl.batch_job import Progress, read_conversations
from qwen2vl.cli import main
from qwen2vl.errors import MediaError
from qwen2vl.processor.fetch import MediaPolicy, relative_to, resolve
from qwen2vl.progress import LOG_EVERY_S, ProgressLine, note

GREEDY = ["--temperature", "0", "--max-tokens", "4"]


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _answer(tokens: int = 3) -> dict:
    return {"id": 1, "text": "x", "usage": {"prompt_tokens": 1, "completion_tokens": tokens}}


def _user(text: str, image: str | None = None) -> list:
    parts = ([{"type": "image", "image": image}] if image else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return Qwen2VL.from_pretrained(tiny_ckpt)


def test_progress_off_a_terminal_is_plain_lines_every_few_seconds_and_one_summary():
    stream, clock = io.StringIO(), Clock()
    progress = Progress(6, ProgressLine(stream, isatty=False, clock=clock))
    for seconds in (1, 2, LOG_EVERY_S + 1, LOG_EVERY_S + 2, 2 * LOG_EVERY_S + 5):
        clock.now = 100.0 + seconds
        progress.add(_answer())
    clock.now = 100.0 + 3 * LOG_EVERY_S  # the last row: no progress line, the summary follows
    progress.add({"id": 6, "error": {"type": "InputError", "message": "bad"}})
    progress.finish(", 1 replica(s)")
    progress.finish()
    lines = stream.getvalue().split("\n")
    assert lines == ["[3/6 rows, 0.27 rows/s, 0.8 tokens/s, 0 failed]",
                     "[5/6 rows, 0.20 rows/s, 0.6 tokens/s, 0 failed]",
                     "[6/6 rows, 0.20 rows/s, 0.5 tokens/s, 1 failed, 30.0 s, 1 replica(s)]", ""]
    assert "\r" not in stream.getvalue()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_redraws_one_line_with_a_bar():
    stream, piped, clock = Terminal(), io.StringIO(), Clock()
    line = ProgressLine(stream, every_s=1.0, clock=clock)
    progress = Progress(4, line)
    clock.now += 0.5
    progress.add(_answer())  # under every_s: not drawn
    assert stream.getvalue() == ""
    clock.now += 1.0
    progress.add(_answer())
    assert stream.getvalue() == "\r\x1b[K 50%|##########          | [2/4 rows, 1.33 rows/s, 4.0 tokens/s, 0 failed]"
    note('{"id": 1}', piped)  # a row to standard output, not the terminal: the line stays
    note("in.jsonl: line 3: bad", stream)  # clears the drawn line first
    clock.now += 1.0
    progress.add(_answer())
    progress.finish()
    assert stream.getvalue().split("\r\x1b[K")[1:] == [
        " 50%|##########          | [2/4 rows, 1.33 rows/s, 4.0 tokens/s, 0 failed]",
        "in.jsonl: line 3: bad\n",
        " 75%|###############     | [3/4 rows, 1.20 rows/s, 3.6 tokens/s, 0 failed]",
        "[3/4 rows, 1.20 rows/s, 3.6 tokens/s, 0 failed, 2.5 s]\n"]
    assert piped.getvalue() == '{"id": 1}\n'


def test_generate_log_has_no_carriage_return_and_one_summary(tiny_ckpt, tmp_path, capsys):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"id": i, "messages": _user(f"hi {i}")}) + "\n" for i in range(3))
                      + json.dumps({"id": 3, "messages": _user("x", str(tmp_path / "gone.png"))}) + "\n")
    assert main(["generate", "--model", str(tiny_ckpt), "--input", str(source), "--output", str(target),
                 "--batch-size", "2", *GREEDY]) == 1
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    loading, *lines = err.splitlines()
    assert loading == f"qwen2vl: loading {tiny_ckpt}"
    assert lines[0].startswith(f"{source}: line 4: messages[0].content[0]: ") and "gone.png" in lines[0]
    assert len(lines) == 2 and lines[1].startswith("[4/4 rows, ") and lines[1].endswith(" s]")
    assert "1 failed" in lines[1]


def test_eval_log_has_plain_lines_and_one_summary(tiny_ckpt, capsys):
    assert main(["eval", str(tiny_ckpt), "--n", "1", "--only", "count", "--batch-size", "1"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    samples = [line for line in err.splitlines() if "samples" in line]
    assert len(samples) == 1 and samples[0].startswith("[1 samples in ") and samples[0].endswith(" s]")


def test_a_row_without_an_id_is_an_error_row_named_by_its_line(tiny_ckpt, llm, tmp_path, capsys):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps({"id": "a", "messages": _user("hi")}) + "\n\n"
                      + json.dumps(_user("no id")) + "\n"
                      + json.dumps({"id": None, "messages": _user("null id")}) + "\n")
    assert main(["generate", "--model", str(tiny_ckpt), "--input", str(source), "--output", str(target),
                 *GREEDY]) == 1
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    message = "the row has no 'id' (every row needs one, unique in the input); its line number stands in"
    assert rows[0]["text"] == llm.chat(_user("hi"), temperature=0, max_tokens=4).text
    assert rows[1:] == [{"id": "3", "error": {"type": "InputError", "message": message}},
                        {"id": "4", "error": {"type": "InputError", "message": message}}]
    err = capsys.readouterr().err
    assert f"{source}: line 3: {message}" in err and f"{source}: line 4: {message}" in err
    # With int ids (or none), the line number stands in as an int.
    source.write_text(json.dumps({"id": 7, "messages": _user("hi")}) + "\n" + json.dumps(_user("no id")) + "\n")
    assert [row["id"] for row in read_conversations(source)] == [7, 2]


def test_relative_media_paths_are_relative_to_the_input_file(tiny_ckpt, llm, tmp_path, monkeypatch):
    folder, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    (folder / "images").mkdir(parents=True)
    elsewhere.mkdir()
    Image.effect_noise((64, 48), 40).convert("RGB").save(folder / "images" / "a.png")
    source = folder / "in.jsonl"
    source.write_text(json.dumps({"id": 1, "messages": _user("What?", "images/a.png")}) + "\n"
                      + json.dumps({"id": 2, "messages": [{"role": "user", "content": [
                          {"type": "video", "video": ["images/a.png", "images/a.png"]},
                          {"type": "text", "text": "And?"}]}]}) + "\n")
    monkeypatch.chdir(elsewhere)
    assert main(["generate", "--model", str(tiny_ckpt), "--input", "../data/in.jsonl", "--output", "out.jsonl",
                 *GREEDY]) == 0
    rows = [json.loads(line) for line in (elsewhere / "out.jsonl").read_text().splitlines()]
    absolute = str(folder / "images" / "a.png")
    expected = llm.chat([_user("What?", absolute),
                         [{"role": "user", "content": [{"type": "video", "video": [absolute, absolute]},
                                                       {"type": "text", "text": "And?"}]}]],
                        temperature=0, max_tokens=4)
    assert [row["text"] for row in rows] == [c.text for c in expected]


def test_relative_to_changes_only_relative_paths(tmp_path):
    png = Image.new("RGB", (4, 4))
    buffer = io.BytesIO()
    png.save(buffer, format="PNG")
    import base64

    raw = base64.b64encode(buffer.getvalue()).decode()
    for source in ("https://example.com/a.png", "http://h/a.png", "file:///tmp/a.png", "data:image/png;base64,AAAA",
                   "/abs/a.png", "~/a.png", raw, "s3://bucket/a.png"):
        assert relative_to(source, tmp_path) == source
    assert relative_to("a.png", tmp_path) == str(tmp_path / "a.png")
    assert relative_to("../x/a.png", tmp_path) == str(tmp_path / ".." / "x" / "a.png")
    # The allowed folder is checked on the joined path.
    (tmp_path / "outside.png").write_bytes(buffer.getvalue())
    (tmp_path / "allowed").mkdir()
    policy = MediaPolicy(allowed_dir=tmp_path / "allowed")
    with pytest.raises(MediaError, match="outside the allowed media folder"):
        resolve(relative_to("../outside.png", tmp_path / "allowed"), policy)


def test_generate_reads_standard_input_and_writes_standard_output(tiny_ckpt, llm, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "here"
    folder.mkdir()
    Image.effect_noise((64, 48), 40).convert("RGB").save(folder / "a.png")
    lines = (json.dumps({"id": "x", "messages": _user("What?", "a.png")}) + "\n"
             + json.dumps({"id": "y", "messages": _user("hi")}) + "\n")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(lines.encode())))
    monkeypatch.chdir(folder)  # standard input's relative paths: the current folder's
    assert main(["generate", "--model", str(tiny_ckpt), "--input", "-", "--output", "-", *GREEDY]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    expected = llm.chat([_user("What?", str(folder / "a.png")), _user("hi")], temperature=0, max_tokens=4)
    assert [(row["id"], row["text"]) for row in rows] == [("x", expected[0].text), ("y", expected[1].text)]
    assert err.splitlines()[-1].startswith("[2/2 rows, ") and "{" not in err


def test_standard_input_and_output_are_refused_where_they_cannot_work(tiny_ckpt, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"id": 1, "messages": _user("hi")}) + "\n")
    assert main(["generate", "--model", str(tiny_ckpt), "--input", str(source), "--output", "-", "--resume"]) == 2
    assert ("qwen2vl: error: --resume continues an --output file; standard output (--output -) cannot be read back"
            in capsys.readouterr().err)
    assert main(["generate", "--ray", "--model", str(tiny_ckpt), "--input", "-"]) == 2
    assert "qwen2vl: error: --input -: with --ray, the workers read the input" in capsys.readouterr().err


def test_calibration_files_need_no_ids(tmp_path):
    """`quantize --calibration` reads lists of messages: the id rule of a job is not its, the
    relative paths are."""
    from qwen2vl.quantize import read_calibration

    source = tmp_path / "calibration.jsonl"
    source.write_text(json.dumps(_user("What?", "a.png")) + "\n" + json.dumps({"messages": _user("hi")}) + "\n")
    assert read_calibration(source) == [_user("What?", str(tmp_path / "a.png")), _user("hi")]
