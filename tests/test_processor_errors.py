"""Every bad input raises one of our ValueErrors naming the message, the content part and the cause."""
from __future__ import annotations

import base64
import http.server
import io
import socket
import ssl
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from processor_reference import write_checkpoint_files

from qwen2vl.errors import InputError, MediaError
from qwen2vl.processor import MediaPolicy, Processor

TLS = Path(__file__).parent / "tls"


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
        if self.path == "/drip":  # headers at once, then 100 bytes of body at one byte per 50 ms
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self._drip(b"x" * 100)
            return
        if self.path == "/drip-headers":  # the headers themselves at one byte per 50 ms
            self.wfile.write(b"HTTP/1.0 200 OK\r\n")
            self._drip(b"X-Padding: " + b"x" * 100 + b"\r\n\r\n")
            return
        if self.path.startswith("/hop/"):  # /hop/N: a redirect to /hop/N-1 after 200 ms; /hop/0 to the image
            hops = int(self.path.rsplit("/", 1)[1])
            time.sleep(0.2)
            self.send_response(302)
            self.send_header("Location", f"/hop/{hops - 1}" if hops else "/ok.png")
            self.end_headers()
            return
        if self.path == "/to-localhost":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_port}/ok.png")
            self.end_headers()
            return
        if self.path == "/ok.png":
            body = self.server.png
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_error(404)

    def _drip(self, data: bytes) -> None:
        try:
            for byte in data:
                self.wfile.write(bytes([byte]))
                time.sleep(0.05)
        except OSError:  # the client hung up
            pass

    def log_message(self, *args):
        pass


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (10, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.png = _png_bytes()
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


def test_a_media_policy_and_its_keywords(checkpoint, tmp_path):
    """`from_pretrained(media_policy=)` is the processor's policy; a media keyword sets one of its fields."""
    policy = MediaPolicy(allow_remote=False, allowed_dir=tmp_path)
    assert Processor.from_pretrained(checkpoint, media_policy=policy).media_policy == policy
    assert Processor.from_pretrained(checkpoint, media_policy=policy, fetch_timeout=2).media_policy == MediaPolicy(
        allow_remote=False, allowed_dir=tmp_path, timeout=2)
    assert Processor.from_pretrained(checkpoint, max_media_bytes=100).media_policy == MediaPolicy(max_bytes=100)


@pytest.mark.parametrize("path", ["/drip", "/drip-headers"])
def test_a_dripping_server_is_cut_off_at_the_fetch_deadline(processor, server, path):
    # each byte comes well within the 0.5 s timeout, the whole takes 5 s: only a total deadline stops it
    raises(processor, with_image(f"{server}{path}"), MediaError, "timed out after 0.5s")


def _patient(processor, **policy):
    """`processor` with the default 10 s fetch timeout (and `policy`)."""
    return processor.with_media(MediaPolicy(**policy), processor.budget)


def test_redirects_count_against_the_same_deadline(processor, server):
    patient = _patient(processor)
    assert patient.prepare(with_image(f"{server}/hop/1")).vision_items[0].original_size == (40, 40)
    # five hops of 200 ms each: every hop within the 0.5 s timeout, all of them not
    raises(processor, with_image(f"{server}/hop/4"), MediaError, "timed out after 0.5s")


def test_address_refused_by_policy(checkpoint, server):
    def no_loopback(host, address):
        if address.is_loopback:
            raise ValueError("loopback address")

    guarded = Processor.from_pretrained(checkpoint, check_address=no_loopback)
    raises(guarded, with_image(f"{server}/ok.png"), MediaError,
           r"host '127.0.0.1' \(127.0.0.1\) refused: loopback address")


def test_redirect_target_is_checked(processor, server):
    def no_localhost(host, address):
        if host == "localhost":
            raise ValueError("not that one")

    guarded = _patient(processor, check_address=no_localhost)
    raises(guarded, with_image(f"{server}/to-localhost"), MediaError, "host 'localhost' .* refused: not that one")


@pytest.fixture(scope="module")
def tls_server():
    """An HTTPS server on 127.0.0.1 whose certificate (tests/tls, signed by tests/tls/ca.pem) names only media.example."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(TLS / "media.example.pem")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    httpd.png = _png_bytes()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_port
    httpd.shutdown()


def test_https_is_verified_against_the_host_name(processor, tls_server, monkeypatch):
    """The fetcher connects to the address it resolved, while TLS still checks the certificate for the name."""
    real = socket.getaddrinfo

    def media_example_is_local(host, *args, **kwargs):
        return real("127.0.0.1" if host == "media.example" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", media_example_is_local)
    monkeypatch.setenv("SSL_CERT_FILE", str(TLS / "ca.pem"))
    patient = _patient(processor)
    item = patient.prepare(with_image(f"https://media.example:{tls_server}/ok.png")).vision_items[0]
    assert item.original_size == (40, 40)
    raises(patient, with_image(f"https://127.0.0.1:{tls_server}/ok.png"), MediaError,
           "certificate verify failed: IP address mismatch")
    monkeypatch.delenv("SSL_CERT_FILE")
    raises(patient, with_image(f"https://media.example:{tls_server}/ok.png"), MediaError,
           "certificate verify failed")


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
    error = raises(processor, with_image(Image.new("RGB", (50, 50)), max_pixels="big"), InputError,
                   "max_pixels must be a positive number")
    assert error.field == "max_pixels"
    error = raises(processor, with_image(Image.new("RGB", (50, 50)), min_pixels=5000, max_pixels=4000), InputError,
                   r"min_pixels \(5000\) is greater")
    assert error.field == "min_pixels"
    error = raises(processor, with_image(Image.new("RGB", (50, 50)), resized_height=56), InputError,
                   "resized_height and resized_width must be given together")
    assert error.field == "resized_width"


def test_message_format_errors(processor):
    with pytest.raises(InputError, match="non-empty list"):
        processor.prepare([])
    raises(processor, [{"role": "robot", "content": "hi"}], InputError, "unknown role 'robot'", where=(0, None))
    raises(processor, [{"role": "user", "content": [{"type": "text", "text": 3}]}], InputError, "text must be a string", where=(0, 0))
    raises(processor, [{"role": "user", "content": None}], InputError, "content must be", where=(0, None))


def test_placeholder_token_in_text(processor):
    with pytest.raises(InputError, match="must not contain vision placeholder"):
        processor.prepare([{"role": "user", "content": "sneaky <|image_pad|>"}])


# --- what was received, in the user's terms -----------------------------------------------------

def _data_uri(media_type: str, data: bytes) -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def test_non_image_data_uri_says_what_it_got(processor):
    error = raises(processor, with_image(_data_uri("text/plain", b"hello, this is text")), MediaError,
                   "data URI of type text/plain is not an image")
    assert "BytesIO" not in str(error)
    raises(processor, with_image(_data_uri("image/png", b"hello, this is text")), MediaError,
           r"data URI is not an image PIL can read \(it starts with b'hello, this is t'\)")


def test_text_file_as_image(processor, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("just some words")
    raises(processor, with_image(str(path)), MediaError, r"file .*notes.txt is not an image PIL can read \(it starts with b'just some words'\)")


def test_folder_as_image(processor, tmp_path):
    error = raises(processor, with_image(str(tmp_path)), MediaError, "is a directory, not a file")
    assert "not found" not in str(error)


def test_image_over_the_pixel_limit_names_our_limit(processor, monkeypatch):
    """Refused from the header: the pixels are never decoded."""
    from PIL import ImageFile
    from test_server import _png_bytes_of_size  # a 20000x20000 PNG header and zero rows, 1.2 MB

    def never_decode(image):
        raise AssertionError(f"the pixels of a {image.size} image were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", never_decode)
    error = raises(processor, with_image(_data_uri("image/png", _png_bytes_of_size(20000, 20000))), MediaError,
                   "the image is 400000000 pixels, over the limit of 89478485 pixels")
    assert "decompression bomb" not in str(error)
    raises(processor, with_image(_data_uri("image/png", _png_bytes_of_size(9500, 9500))), MediaError,
           "the image is 9500x9500 = 90250000 pixels, over the limit of 89478485 pixels")


def _video(tmp_path, frames: int):
    av = pytest.importorskip("av")
    path = tmp_path / f"{frames}.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 56, 56, "yuv420p"
        for index in range(frames):
            pixels = np.full((56, 56, 3), index * 30 % 256, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return str(path)


def with_video(value, **options):
    return [{"role": "user", "content": [{"type": "text", "text": "watch"}, {"type": "video", "video": value, **options}]}]


def test_nframes_below_two(processor, tmp_path):
    error = raises(processor, with_video(_video(tmp_path, 8), nframes=1), InputError,
                   r"nframes must be at least 2 \(frames are sampled in pairs\), got 1", where=(0, 1))
    assert error.field == "nframes" and "cannot sample" not in str(error)
    error = raises(processor, with_video(_video(tmp_path, 8), nframes=20), MediaError,
                   "nframes asks for 20 frames; the video has only 8", where=(0, 1))
    assert error.field == "nframes"


def test_picture_given_as_a_video(processor, tmp_path):
    pytest.importorskip("av")
    path = tmp_path / "still.png"
    Image.new("RGB", (40, 30)).save(path)
    raises(processor, with_video(str(path)), MediaError, r"file .*still.png is a still image \(png_pipe\), not a video; "
           "send it as an image", where=(0, 1))
    raises(processor, with_video(_data_uri("text/plain", b"hello, this is text")), MediaError,
           "data URI of type text/plain is not a video", where=(0, 1))


def test_one_frame_video(processor, tmp_path):
    raises(processor, with_video(_video(tmp_path, 1)), MediaError,
           "the video has only 1 frame; a video needs at least 2", where=(0, 1))
