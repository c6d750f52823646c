"""`qwen2vl chat`: --draw-boxes with any image source, the interactive commands, --device."""
from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

from qwen2vl import Qwen2VL
from qwen2vl.cli import chat_loop, main
from qwen2vl.errors import InputError
from qwen2vl.sampling_params import SamplingParams

GREEDY = ["--temperature", "0", "--max-tokens", "8"]
PROMPT = "Where is the red circle?"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "noise.png"
    Image.effect_noise((64, 48), 60).convert("RGB").save(path)
    return path


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return Qwen2VL.from_pretrained(tiny_ckpt)


def _greedy(llm, content, max_tokens=8):
    return llm.chat([{"role": "user", "content": content}], temperature=0, max_tokens=max_tokens).text


def _data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.mark.parametrize("source", ["data", "file"])
def test_draw_boxes_takes_data_and_file_urls_and_prints_the_answer(tiny_ckpt, llm, image, tmp_path, capsys, source):
    url = _data_uri(image) if source == "data" else f"file://{image}"
    out = tmp_path / "boxes.png"
    assert main(["chat", "--model", str(tiny_ckpt), "--image", url, *GREEDY, "--draw-boxes", str(out), PROMPT]) == 0
    stdout, err = capsys.readouterr()
    assert stdout == _greedy(llm, [{"type": "image", "image": str(image)}, {"type": "text", "text": PROMPT}]) + "\n"
    assert Image.open(out).size == (64, 48)
    assert f"drawn to {out}" in err and "Traceback" not in err


def test_draw_boxes_refuses_a_missing_folder_before_loading(tiny_ckpt, image, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Qwen2VL, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    out = tmp_path / "no-such-folder" / "boxes.png"
    assert main(["chat", "--model", str(tiny_ckpt), "--image", str(image), "--draw-boxes", str(out), PROMPT]) == 2
    stdout, err = capsys.readouterr()
    assert stdout == ""
    assert err == f"qwen2vl: error: --draw-boxes {out}: folder {out.parent} does not exist\n"
    assert main(["chat", "--model", str(tiny_ckpt), "--image", str(image), "--draw-boxes", str(tmp_path / "b.xyz"),
                 PROMPT]) == 2
    assert "cannot write images of type '.xyz'" in capsys.readouterr().err
    assert main(["chat", "--model", str(tiny_ckpt), "--draw-boxes", str(tmp_path / "b.png"), PROMPT]) == 2
    assert "--draw-boxes needs an --image" in capsys.readouterr().err


def test_draw_boxes_failing_to_write_still_prints_the_answer(tiny_ckpt, llm, image, tmp_path, capsys, monkeypatch):
    def refuse(self, path, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", refuse)
    out = tmp_path / "boxes.png"
    assert main(["chat", "--model", str(tiny_ckpt), "--image", str(image), *GREEDY, "--draw-boxes", str(out),
                 PROMPT]) == 2
    stdout, err = capsys.readouterr()
    assert stdout == _greedy(llm, [{"type": "image", "image": str(image)}, {"type": "text", "text": PROMPT}]) + "\n"
    assert err == (f"qwen2vl: loading {tiny_ckpt}\n"
                   f"qwen2vl: error: --draw-boxes {out}: cannot write the image (disk full)\n")


def _run_loop(llm, lines, history=None):
    script = iter(lines)

    def read(prompt=""):
        try:
            return next(script)
        except StopIteration:
            raise EOFError from None

    return chat_loop(llm, history or [], SamplingParams(temperature=0, max_tokens=8), [], [], False, read=read)


def test_interactive_commands_are_answered_not_sent(llm, image, capsys):
    assert _run_loop(llm, ["/image", "/help", "/frobnicate now", "/video", "Hi"]) == 0
    stdout, err = capsys.readouterr()
    assert stdout.splitlines() == [_greedy(llm, [{"type": "text", "text": "Hi"}])]
    assert "usage: /image PATH" in err and "usage: /video PATH" in err
    for command in ("/image PATH_OR_URL", "/video PATH", "/reset", "/help", "/quit"):
        assert command in err
    assert "unknown command /frobnicate; /help lists the commands" in err


def test_interactive_confirms_attachments_and_reset(llm, image, capsys):
    assert _run_loop(llm, [f"/image {image}", "/reset", f"/image {image}", "What?", "/quit", "never read"]) == 0
    stdout, err = capsys.readouterr()
    assert f"image attached: {image}" in err
    assert "conversation cleared (1 attachment(s) dropped)" in err
    expected = _greedy(llm, [{"type": "image", "image": str(image)}, {"type": "text", "text": "What?"}])
    assert stdout.splitlines() == [expected]


def test_interactive_refuses_a_missing_file_and_goes_on(llm, tmp_path, capsys):
    assert _run_loop(llm, [f"/image {tmp_path / 'gone.png'}", f"/video {tmp_path / 'gone.mp4'}", "Hi"]) == 0
    stdout, err = capsys.readouterr()
    assert f"error: /image {tmp_path / 'gone.png'}: " in err and f"/video {tmp_path / 'gone.mp4'}: no such file" in err
    assert "attached" not in err
    assert stdout.splitlines() == [_greedy(llm, [{"type": "text", "text": "Hi"}])]


def test_double_slash_sends_a_message_starting_with_a_slash(llm, capsys):
    assert _run_loop(llm, ["//etc is a folder"]) == 0
    assert capsys.readouterr().out.splitlines() == [_greedy(llm, [{"type": "text", "text": "/etc is a folder"}])]


@pytest.mark.parametrize("device", ["tpu", "cuda", "cuda:7"])
def test_unknown_or_absent_device_is_a_one_line_error(tiny_ckpt, capsys, device):
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that GPU")
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["chat", "--model", str(tiny_ckpt), "--device", device, "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qwen2vl: error: device '{device}'") and "available: cpu" in err
    assert len(err.splitlines()) == 1
    with pytest.raises(InputError, match=f"device '{device}'") as caught:
        Qwen2VL.from_pretrained(tiny_ckpt, device=device)
    assert caught.value.field == "device"
