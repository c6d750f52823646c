"""The `qwen2vl` command: what a user types, what they see."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from qwen2vl import Qwen2VL
from qwen2vl.cli import main

GREEDY = ["--temperature", "0", "--max-tokens", "8"]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "shapes.png"
    Image.effect_noise((64, 48), 60).convert("RGB").save(path)
    return str(path)


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return Qwen2VL.from_pretrained(tiny_ckpt)


def test_help_explains_commands():
    out = subprocess.run([sys.executable, "-m", "qwen2vl.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for word in ("chat", "generate", "serve", "examples:"):
        assert word in out.stdout


def test_chat_one_shot_prints_the_answer(tiny_ckpt, image, llm, capsys):
    assert main(["chat", "--model", str(tiny_ckpt), "--image", image, *GREEDY, "--timing", "Describe."]) == 0
    out, err = capsys.readouterr()
    expected = llm.chat([{"role": "user", "content": [{"type": "image", "image": image},
                                                      {"type": "text", "text": "Describe."}]}],
                        temperature=0, max_tokens=8)
    assert out == expected.text + "\n"
    assert "time to first text" in err and "tokens/s" in err and "loaded" in err


def test_chat_interactive_keeps_history_and_attaches_images(tiny_ckpt, image, llm, monkeypatch, capsys):
    lines = iter([f"/image {image}", "What is this?", "And now?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(tiny_ckpt), *GREEDY]) == 0
    out = capsys.readouterr().out.splitlines()
    first = llm.chat([{"role": "user", "content": [{"type": "image", "image": image},
                                                   {"type": "text", "text": "What is this?"}]}],
                     temperature=0, max_tokens=8)
    history = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]},
               {"role": "assistant", "content": first.text},
               {"role": "user", "content": [{"type": "text", "text": "And now?"}]}]
    second = llm.chat(history, temperature=0, max_tokens=8)
    assert out == [first.text, second.text]


def test_generate_jsonl_batch(tiny_ckpt, image, llm, tmp_path):
    conversations = [
        {"id": 1, "messages": [{"role": "user", "content": "Hello"}]},
        {"id": "img", "messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                                {"type": "text", "text": "What?"}]}]},
    ]
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    assert main(["generate", "--model", str(tiny_ckpt), "--input", str(source), "--output", str(target),
                 "--batch-size", "2", *GREEDY]) == 0
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, "img"]
    expected = llm.chat([c["messages"] for c in conversations], temperature=0, max_tokens=8)
    assert [r["text"] for r in rows] == [c.text for c in expected]
    assert rows[1]["usage"] == {"prompt_tokens": expected[1].usage.prompt_tokens, "completion_tokens": 8}
    assert rows[1]["finish_reason"] == "length"


def test_draw_boxes_writes_the_image(tiny_ckpt, image, tmp_path, capsys):
    out = tmp_path / "boxes.png"
    assert main(["chat", "--model", str(tiny_ckpt), "--image", image, *GREEDY, "--draw-boxes", str(out),
                 "Where is the red circle?"]) == 0
    assert Image.open(out).size == (64, 48)
    assert "drawn to" in capsys.readouterr().err


def test_errors_are_one_line_messages(tiny_ckpt, tmp_path, capsys):
    assert main(["chat", "--model", str(tmp_path / "nothing"), "hi"]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert main(["chat", "--model", str(tiny_ckpt), "--image", str(tmp_path / "missing.png"), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qwen2vl: loading {tiny_ckpt}\nqwen2vl: error: ") and "missing.png" in err
    assert "Traceback" not in err


def test_generate_names_the_bad_line(tiny_ckpt, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "messages": [{"role": "user", "content": "hi"}]}\n{"id": 2, "messages": 3}\n')
    assert main(["generate", "--model", str(tiny_ckpt), "--input", str(source)]) == 2
    assert f"{source}: line 2: expected an object with 'id' and 'messages' (a list of messages)" in capsys.readouterr().err


def test_generate_writes_an_error_row_and_goes_on(tiny_ckpt, image, llm, tmp_path, capsys):
    """A bad row is an error row naming its part; the others are answered; exit status 1.
    The stderr line counts lines from 1, blank ones included; the batch's own index never shows."""
    good = [{"role": "user", "content": "hi"}]
    bad = [{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "gone.png")},
                                        {"type": "text", "text": "What?"}]}]
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"id": i, "messages": m}) + "\n" if m else "\n"
                              for i, m in enumerate([good, None, good, bad], start=1)))
    assert main(["generate", "--model", str(tiny_ckpt), "--input", str(source), "--output", str(target),
                 "--batch-size", "2", *GREEDY]) == 1
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 3, 4]
    expected = llm.chat(good, temperature=0, max_tokens=8).text
    assert rows[0]["text"] == rows[1]["text"] == expected
    assert rows[2]["error"]["type"] == "MediaError"
    assert rows[2]["error"]["message"].startswith("messages[0].content[0]: ") and "gone.png" in rows[2]["error"]["message"]
    assert set(rows[2]) == {"id", "error"}
    err = capsys.readouterr().err
    assert f"{source}: line 4: messages[0].content[0]: " in err and "conversations[" not in err
    assert "3/3 rows" in err and "1 failed" in err and "rows/s" in err and "tokens/s" in err
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_generate_never_destroys_an_existing_output(tiny_ckpt, tmp_path, capsys):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps({"id": 1, "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    target.write_text('{"id": "kept"}\n')
    assert main(["generate", "--model", str(tmp_path / "nothing"), "--input", str(source),
                 "--output", str(target)]) == 2
    assert target.read_text() == '{"id": "kept"}\n'
    assert main(["generate", "--model", str(tiny_ckpt), "--input", str(tmp_path / "missing.jsonl"),
                 "--output", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"qwen2vl: error: --input {tmp_path / 'missing.jsonl'}: no such file" in err and "Traceback" not in err
    assert target.read_text() == '{"id": "kept"}\n'


def test_generate_refuses_a_repeated_id(tiny_ckpt, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    conversation = [{"role": "user", "content": "hi"}]
    source.write_text("".join(json.dumps({"id": "a", "messages": conversation}) + "\n" for _ in range(2)))
    assert main(["generate", "--model", str(tiny_ckpt), "--input", str(source)]) == 2
    assert f"{source}: line 2: id 'a' is also on line 1; ids must be unique" in capsys.readouterr().err


def test_generate_resume_answers_only_the_missing_rows(tiny_ckpt, llm, tmp_path):
    """A stopped job's rows are in OUT.partial (its last line cut short); --resume finishes it."""
    conversations = [{"id": f"c{i}", "messages": [{"role": "user", "content": f"Count to {i}"}]} for i in range(5)]
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    assert main(["generate", "--model", str(tiny_ckpt), "--input", str(source), "--output", str(target),
                 *GREEDY]) == 0
    complete = target.read_text().splitlines()
    target.rename(tmp_path / "out.jsonl.partial")
    (tmp_path / "out.jsonl.partial").write_text("\n".join(complete[:2]) + "\n" + complete[2][:10])
    assert main(["generate", "--model", str(tiny_ckpt), "--input", str(source), "--output", str(target),
                 "--resume", *GREEDY]) == 0
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["c0", "c1", "c2", "c3", "c4"]
    assert target.read_text().splitlines() == complete
    assert not (tmp_path / "out.jsonl.partial").exists()
    # Everything answered: a second --resume runs nothing and keeps the file.
    assert main(["generate", "--model", str(tiny_ckpt), "--input", str(source), "--output", str(target),
                 "--resume", *GREEDY]) == 0
    assert target.read_text().splitlines() == complete


def test_generate_stopped_keeps_its_rows_for_resume(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """Ctrl-C after the first batch: the output is untouched, the batch in OUT.partial, --resume finishes."""
    import qwen2vl.batch_job as batch_job

    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"id": i, "messages": [{"role": "user", "content": f"hi {i}"}]}) + "\n"
                              for i in range(1, 5)))
    target.write_text("old\n")
    answer_chunk = batch_job._answer_chunk

    def stop_after_the_first(llm, rows, params):
        if rows[0]["id"] != 1:
            raise KeyboardInterrupt
        return answer_chunk(llm, rows, params)

    monkeypatch.setattr(batch_job, "_answer_chunk", stop_after_the_first)
    args = ["generate", "--model", str(tiny_ckpt), "--input", str(source), "--output", str(target),
            "--batch-size", "2", *GREEDY]
    assert main(args) == 130
    assert target.read_text() == "old\n"
    assert [json.loads(line)["id"] for line in (tmp_path / "out.jsonl.partial").read_text().splitlines()] == [1, 2]
    assert f"the rows written so far are in {tmp_path / 'out.jsonl.partial'}" in capsys.readouterr().err
    monkeypatch.setattr(batch_job, "_answer_chunk", answer_chunk)
    assert main([*args, "--resume"]) == 0
    assert [json.loads(line)["id"] for line in target.read_text().splitlines()] == [1, 2, 3, 4]


def test_generate_ray_flags_need_ray(tmp_path, capsys):
    assert main(["generate", "--input", str(tmp_path / "in.jsonl"), "--num-replicas", "2"]) == 2
    assert "qwen2vl: error: --num-replicas and --ray-address go with --ray" in capsys.readouterr().err


def test_generate_answers_and_resumes_rows_holding_line_separators(tiny_ckpt, llm, tmp_path):
    """U+2028 and U+0085 are characters inside a JSON string (str.splitlines would split there):
    their rows are answered, and --resume reads the job's own output, which holds them raw."""
    conversations = [{"id": f"{i}\u2028{i}\u0085", "messages": [{"role": "user", "content": f"a\u2028b\u0085c {i}"}]}
                     for i in range(3)]
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations), encoding="utf-8")
    args = ["generate", "--model", str(tiny_ckpt), "--input", str(source), "--output", str(target), *GREEDY]
    assert main(args) == 0
    complete = target.read_text(encoding="utf-8").split("\n")[:-1]
    rows = [json.loads(line) for line in complete]
    assert [row["id"] for row in rows] == [c["id"] for c in conversations]
    expected = llm.chat([c["messages"] for c in conversations], temperature=0, max_tokens=8)
    assert [row["text"] for row in rows] == [c.text for c in expected]
    # Stopped after the first row, the second cut short: --resume keeps the first, answers the rest.
    target.rename(tmp_path / "out.jsonl.partial")
    (tmp_path / "out.jsonl.partial").write_text(complete[0] + "\n" + complete[1][:12], encoding="utf-8")
    assert main([*args, "--resume"]) == 0
    assert target.read_text(encoding="utf-8").split("\n")[:-1] == complete


def test_generate_line_over_max_line_bytes_is_an_error_row(tiny_ckpt, llm, tmp_path, capsys):
    """A line over --max-line-bytes is not read: its row is an error named by its leading id (else
    its line number, a string as the file's other ids are), and the other rows are answered."""
    conversation = [{"role": "user", "content": "hi"}]
    long = [{"role": "user", "content": "x" * 400}]
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join([json.dumps({"id": "ok", "messages": conversation}),
                                 json.dumps({"id": "big", "messages": long}),
                                 json.dumps(long),
                                 json.dumps({"messages": long, "id": "late"}),
                                 json.dumps({"id": "ok2", "messages": conversation})]) + "\n")
    assert main(["generate", "--model", str(tiny_ckpt), "--input", str(source), "--output", str(target),
                 "--max-line-bytes", "200", *GREEDY]) == 1
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [row["id"] for row in rows] == ["ok", "big", "3", "4", "ok2"]
    expected = llm.chat(conversation, temperature=0, max_tokens=8).text
    assert rows[0]["text"] == rows[4]["text"] == expected
    message = "the line is longer than 200 bytes (--max-line-bytes); it was not read"
    for row in rows[1:4]:
        assert row["error"] == {"type": "InputError", "message": message}
    err = capsys.readouterr().err
    assert f"{source}: line 2: {message}" in err and "5/5 rows" in err and "3 failed" in err


@pytest.mark.parametrize("content", [
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01",  # an image given as --input
    bytes(range(256)) * 4,
    "[]\n".encode("utf-16"),
    b"hello, world\n",
    b"\x00" * 9000,  # no newline, over the limit
    b"[" + b"9" * 5000 + b"]\n",  # over Python's limit of digits in an integer
], ids=["png", "bytes", "utf-16", "text", "long", "digits"])
def test_generate_garbage_input_exits_2_with_one_line(tiny_ckpt, tmp_path, capsys, content):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(content)
    assert main(["generate", "--model", str(tiny_ckpt), "--input", str(source), "--output", str(target),
                 "--max-line-bytes", "8192"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qwen2vl: error: {source}: line 1: not ") and err.count("\n") == 1
    assert not target.exists() and not (tmp_path / "out.jsonl.partial").exists()


def test_generate_lone_surrogate_escapes_are_an_error_row_and_an_escaped_id(tiny_ckpt, tmp_path):
    """JSON parses "\\ud800" (half of a UTF-16 pair) and no tokenizer takes it: the row is an
    error row and the job goes on; an id holding one is written with its escape and read back."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text('{"id": "\\ud800", "messages": [{"role": "user", "content": "hi \\udc00"}]}\n'
                      '{"id": "ok", "messages": [{"role": "user", "content": "hi \\ud83d\\ude00"}]}\n')
    args = ["generate", "--model", str(tiny_ckpt), "--input", str(source), "--output", str(target), *GREEDY]
    assert main(args) == 1
    lines = target.read_text(encoding="utf-8").splitlines()
    assert lines[0] == ('{"id": "\\ud800", "error": {"type": "InputError", "message": "messages: the escape '
                        '\\\\udc00 is half of a UTF-16 surrogate pair, not a character"}}')
    assert json.loads(lines[1])["id"] == "ok" and json.loads(lines[1])["finish_reason"] == "length"
    assert main([*args, "--resume"]) == 0
    assert target.read_text(encoding="utf-8").splitlines() == lines
