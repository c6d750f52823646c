"""Every bad input raises one of our ValueErrors naming the message, the content part and the cause."""
from __future__ import annotations

import http.server
import threading
import time

import numpy as np
import pytest
from PIL import Image

from processor_reference import write_checkpoint_files

from qwen2vl.errors import InputError, MediaError
from qwen2vl.processor import Processor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint_files(tmp_path_factory.mktemp("errors-ckpt"))


@pytest.fixture(scope="module")
def processor(checkpoint):
    return Processor.from_pretrained(checkpoint, fetch_timeout=0.5)


def with_image(value, **options):
    """messages[1].content[1] holds the image under test."""
    return [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image", "image": value, **options}]},
    ]


def raises(processor, messages, error, match, where=(1, 1)):
    with pytest.raises(error, match=match) as caught:
        processor.prepare(messages)
    assert isinstance(caught.value, ValueError)
    assert (caught.value.message_index, caught.value.content_index) == where
    prefix = f"messages[{where[0]}]" + ("" if where[1] is None else f".content[{where[1]}]")
    assert str(caught.value).startswith(prefix + ": ")
    return caught.value


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/slow":
            time.sleep(2)
        if self.path == "/ok.png":
            body = self.server.png
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("srv") / "ok.png"
    Image.new("RGB", (40, 40), (10, 20, 30)).save(path)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.png = path.read_bytes()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


def test_url_image_loads(processor, server):
    item = processor.prepare(with_image(f"{server}/ok.png")).vision_items[0]
    assert item.original_size == (40, 40) and item.grid_thw == (1, 4, 4)


def test_corrupt_image(processor, tmp_path):
    path = tmp_path / "bad.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    raises(processor, with_image(str(path)), MediaError, "cannot read image")


def test_truncated_image(processor, tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])
    raises(processor, with_image(str(path)), MediaError, "cannot decode image")


def test_unsupported_scheme(processor):
    raises(processor, with_image("ftp://example.com/a.png"), MediaError, "unsupported URL scheme 'ftp'")


def test_missing_file(processor, tmp_path):
    raises(processor, with_image(str(tmp_path / "nope.jpg")), MediaError, "file not found")
    raises(processor, with_image(f"file://{tmp_path}/nope.jpg"), MediaError, "file not found")


def test_url_fails(processor, server):
    raises(processor, with_image(f"{server}/missing.png"), MediaError, "HTTP 404")


def test_url_times_out(processor, server):
    raises(processor, with_image(f"{server}/slow"), MediaError, "timed out after 0.5s")


def test_remote_fetch_switched_off(checkpoint, server):
    offline = Processor.from_pretrained(checkpoint, allow_remote_media=False)
    raises(offline, with_image(f"{server}/ok.png"), MediaError, "remote media is disabled")


def test_host_refused_by_policy(checkpoint, server):
    def no_loopback(host):
        if host.startswith("127."):
            raise ValueError("loopback address")

    guarded = Processor.from_pretrained(checkpoint, check_host=no_loopback)
    raises(guarded, with_image(f"{server}/ok.png"), MediaError, "refused: loopback address")


def test_over_byte_limit(checkpoint, server, tmp_path):
    small = Processor.from_pretrained(checkpoint, max_media_bytes=100)
    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    raises(small, with_image(str(path)), MediaError, "over the limit of 100")
    raises(small, with_image(f"{server}/ok.png"), MediaError, "over the limit of 100")


def test_outside_allowed_media_dir(checkpoint, tmp_path):
    confined = Processor.from_pretrained(checkpoint, allowed_media_dir=tmp_path / "inside")
    path = tmp_path / "outside.png"
    Image.new("RGB", (30, 30)).save(path)
    raises(confined, with_image(str(path)), MediaError, "outside the allowed media folder")


def test_zero_size_image(processor):
    raises(processor, with_image(Image.new("RGB", (0, 0))), MediaError, r"image is empty \(0x0")


def test_one_pixel_wide_image(processor):
    raises(processor, with_image(Image.new("RGB", (1, 500))), MediaError, "aspect ratio of 1x500")


def test_video_without_frames(processor, tmp_path):
    video = [{"role": "user", "content": [{"type": "video", "video": []}]}]
    raises(processor, video, MediaError, "no frames", where=(0, 0))
    av = pytest.importorskip("av")
    path = tmp_path / "empty.mkv"  # headers, a video stream, not one frame
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
    video = [{"role": "user", "content": [{"type": "video", "video": str(path)}]}]
    raises(processor, video, MediaError, "no frames|cannot read video", where=(0, 0))


def test_unknown_content_type(processor):
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "audio", "audio": "x.wav"}]}]
    raises(processor, messages, InputError, "unknown content type 'audio'", where=(0, 1))


def test_min_pixels_over_max_pixels(processor, checkpoint):
    raises(processor, with_image(Image.new("RGB", (50, 50)), min_pixels=5000, max_pixels=4000), InputError, r"min_pixels \(5000\) is greater")
    with pytest.raises(InputError, match="min_pixels"):
        Processor.from_pretrained(checkpoint, min_pixels=10_000, max_pixels=5_000)


def test_bad_option_value(processor):
    raises(processor, with_image(Image.new("RGB", (50, 50)), max_pixels="big"), InputError, "max_pixels must be a positive number")


def test_message_format_errors(processor):
    with pytest.raises(InputError, match="non-empty list"):
        processor.prepare([])
    raises(processor, [{"role": "robot", "content": "hi"}], InputError, "unknown role 'robot'", where=(0, None))
    raises(processor, [{"role": "user", "content": [{"type": "text", "text": 3}]}], InputError, "text must be a string", where=(0, 0))
    raises(processor, [{"role": "user", "content": None}], InputError, "content must be", where=(0, None))


def test_placeholder_token_in_text(processor):
    with pytest.raises(InputError, match="must not contain vision placeholder"):
        processor.prepare([{"role": "user", "content": "sneaky <|image_pad|>"}])
