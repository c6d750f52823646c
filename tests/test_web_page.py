"""The chat page at `/`, driven in headless Chromium (Selenium) against a real `qwen2vl serve` of
the demo model: loading, a streamed grounding answer with its box drawn where `Completion.boxes()`
puts it, the server's message for an oversized image, a bad API key, stop mid-stream, a dropped
connection, the phone layout. A screenshot of each state goes to $QWEN2VL_SCREENSHOT_DIR (default:
a temporary folder, printed). The browser tests are skipped, with the reason, where selenium, chromium or chromedriver is
missing (Debian: apt-get install chromium chromium-driver; .ci/run does it); the route test runs
everywhere.
"""
from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "qwen2-vl-shapes-demo"
SHAPES = ROOT / "examples" / "shapes.png"
GROUNDING_QUESTION = "Where is the red circle?"
MAX_IMAGE_PIXELS = 300_000  # server A's limit: shapes.png (280x196) is under it, the 800x600 test image over
API_KEY = "page-test-key"
LONG_ANSWER = 3000  # server B's min and max tokens: an answer long enough to stop mid-stream

try:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
if webdriver is None:
    NO_BROWSER = "selenium is not installed (pip install -e '.[dev]'): skipping the chat page's browser tests"
elif CHROMIUM is None or CHROMEDRIVER is None:
    NO_BROWSER = ("chromium and chromedriver are not installed (apt-get install chromium chromium-driver): "
                  "skipping the chat page's browser tests")
else:
    NO_BROWSER = None
needs_browser = pytest.mark.skipif(NO_BROWSER is not None, reason=NO_BROWSER or "")

httpx = pytest.importorskip("httpx")


# --- a real server -----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`qwen2vl serve` of the demo model in a subprocess, on 127.0.0.1."""

    def __init__(self, *flags: str, api_key: str | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.api_key = api_key
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               "MALLOC_ARENA_MAX": "1"}
        env.pop("QWEN2VL_API_KEY", None)
        command = [sys.executable, "-m", "qwen2vl.cli", "serve", "--model", str(MODEL), "--device", "cpu",
                   "--port", str(self.port), "--log-level", "warning", *flags]
        if api_key:
            command += ["--api-key", api_key]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"qwen2vl serve exited with {self.process.returncode}: {self.process.stderr.read()}")
            try:
                if httpx.get(self.url + "health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        pytest.fail("qwen2vl serve did not answer /health within 120 s")

    def running_requests(self) -> float:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        metrics = httpx.get(self.url + "metrics", headers=headers, timeout=5).text
        line = next(line for line in metrics.splitlines() if line.startswith("qwen2vl_requests_running"))
        return float(line.split()[-1])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stderr.close()


@pytest.fixture(scope="module")
def server():
    """No API key; images over MAX_IMAGE_PIXELS are refused; Swagger UI at /docs."""
    running = Server("--max-image-pixels", str(MAX_IMAGE_PIXELS), "--docs")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def keyed_server():
    """An API key, and answers of LONG_ANSWER tokens. The last test to use it kills it."""
    running = Server("--min-tokens", str(LONG_ANSWER), "--max-tokens", str(LONG_ANSWER), api_key=API_KEY)
    yield running
    running.stop()


# --- the browser -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def screens(tmp_path_factory):
    folder = Path(os.environ.get("QWEN2VL_SCREENSHOT_DIR") or tmp_path_factory.mktemp("web-page-screens"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\n[chat page screenshots: {folder}]")

    def save(driver, name: str) -> None:
        # two animation frames: a scroll or resize just made is painted before the capture
        driver.execute_async_script("requestAnimationFrame(() => requestAnimationFrame(arguments[0]))")
        driver.save_screenshot(str(folder / f"{name}.png"))

    return save


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,900", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = 120, message: str = ""):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d), message)


def open_page(driver, server: Server) -> None:
    driver.get(server.url)
    wait(driver, lambda d: d.find_element(By.ID, "model-name").text or d.find_element(By.ID, "key-dialog").is_displayed(),
         30, "the page neither showed the model's name nor asked for the key")


def attach(driver, path: Path) -> None:
    count = len(driver.find_elements(By.CSS_SELECTOR, "#attachments li"))
    driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(path))
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attachments li")) == count + 1, 10,
         "the attachment did not appear")


def ask(driver, text: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, "textarea")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def finished_answer(driver, timeout: float = 120):
    return wait(driver, lambda d: next((a for a in d.find_elements(By.CSS_SELECTOR, '[data-role="assistant"]')[-1:]
                                        if a.get_attribute("aria-busy") == "false"), None), timeout,
                "no finished answer")


def error_text(driver, timeout: float = 30) -> str:
    return wait(driver, lambda d: next((e.text for e in d.find_elements(By.CSS_SELECTOR, '[data-role="error"]')), None),
                timeout, "no error shown")


def change_settings(driver, **values: str) -> None:
    """Fill the settings dialog's fields (by element id) and save it from the keyboard."""
    driver.find_element(By.ID, "open-settings").click()
    for field_id, value in values.items():
        field = driver.find_element(By.ID, field_id.replace("_", "-"))
        field.clear()
        field.send_keys(value)
    field.send_keys(Keys.ENTER)  # submits the dialog's form: Save
    wait(driver, lambda d: not d.find_element(By.ID, "settings").is_displayed(), 5, "settings did not close")


def record_requests(driver) -> None:
    """From now on, window.sentBodies holds the JSON body of each request the page sends."""
    driver.execute_script("""
        window.sentBodies = [];
        const send = window.fetch;
        window.fetch = (url, options) => {
            if (options && options.body) window.sentBodies.push(JSON.parse(options.body));
            return send(url, options);
        };
    """)


def severe_console_messages(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def drawn_box(driver, box) -> tuple[float, ...]:
    """A box element's rectangle in pixels of its image, as drawn on screen."""
    return driver.execute_script("""
        const box = arguments[0], image = box.closest('figure').querySelector('img');
        const b = box.getBoundingClientRect(), i = image.getBoundingClientRect();
        const scale = image.naturalWidth / i.width;
        return [(b.left - i.left) * scale, (b.top - i.top) * scale, (b.right - i.left) * scale, (b.bottom - i.top) * scale];
    """, box)


# --- the tests ---------------------------------------------------------------------------------

def test_the_page_and_its_files_are_served_without_the_api_key():
    """The route alone (no browser): the page asks for the key itself, the API still needs it."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from qwen2vl import Qwen2VL
    from qwen2vl.server import create_app

    app = create_app(Qwen2VL.from_pretrained(MODEL, device="cpu", max_model_len=256), model_name="demo", api_key=API_KEY)
    with TestClient(app) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for name in ('<textarea id="message"', '<input type="file"', 'src="static/app.js"', 'href="static/style.css"'):
            assert name in page.text
        assert client.get("/static/app.js").status_code == client.get("/static/style.css").status_code == 200
        missing = client.get("/static/nothing.js")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
        assert client.get("/v1/models").status_code == 401
        assert "/" not in client.get("/openapi.json").json()["paths"]


@needs_browser
def test_the_page_loads_with_labelled_controls_and_no_console_errors(server, browser, screens):
    open_page(browser, server)
    assert browser.find_element(By.ID, "model-name").text == MODEL.name  # a directory is served under its folder name
    assert httpx.get(server.url + "static/app.js").headers["content-type"].startswith(("text/javascript", "application/javascript"))
    for control in browser.find_elements(By.CSS_SELECTOR, "textarea, input"):
        label = browser.find_elements(By.CSS_SELECTOR, f'label[for="{control.get_attribute("id")}"]')
        assert label and label[0].get_attribute("textContent").strip(), control.get_attribute("id")
    assert browser.find_element(By.CSS_SELECTOR, "textarea") == browser.switch_to.active_element
    assert not browser.find_element(By.ID, "open-key").is_displayed()  # this server has no key
    textarea = browser.find_element(By.CSS_SELECTOR, "textarea")
    textarea.send_keys("one", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "two")  # a new line, not a send
    assert textarea.get_attribute("value") == "one\ntwo"
    assert browser.find_elements(By.CSS_SELECTOR, '[data-role="user"]') == []
    textarea.clear()
    screens(browser, "01-loaded")
    assert severe_console_messages(browser) == []


@needs_browser
def test_a_grounding_answer_streams_and_its_box_is_drawn_where_completion_boxes_puts_it(server, browser, screens):
    from qwen2vl import Qwen2VL

    llm = Qwen2VL.from_pretrained(MODEL, device="cpu")
    messages = [{"role": "user", "content": [{"type": "image", "image": str(SHAPES)},
                                             {"type": "text", "text": GROUNDING_QUESTION}]}]
    expected = llm.chat(messages, temperature=0.0).boxes()
    del llm
    assert len(expected) == 1

    open_page(browser, server)
    change_settings(browser, temperature="0")
    attach(browser, SHAPES)
    record_requests(browser)
    browser.execute_script("""  // every length the answer's text passes through
        window.answerLengths = new Set();
        new MutationObserver(() => {
            const answer = [...document.querySelectorAll('[data-role="assistant"] .content')].pop();
            if (answer) window.answerLengths.add(answer.textContent.length);
        }).observe(document.getElementById('conversation'), {subtree: true, childList: true, characterData: true});
    """)
    screens(browser, "02-attached")
    ask(browser, GROUNDING_QUESTION)
    answer = finished_answer(browser)
    assert len(browser.execute_script("return [...window.answerLengths]")) > 3  # it arrived in pieces
    stats = answer.find_element(By.CSS_SELECTOR, ".stats").text
    assert "first token" in stats and "tokens/s" in stats, stats
    user_image = browser.find_element(By.CSS_SELECTOR, '[data-role="user"] img')
    assert user_image.get_attribute("alt") == "Attached image shapes.png (280×196 pixels)"

    boxes = answer.find_elements(By.CSS_SELECTOR, "[data-box]")
    assert len(boxes) == 1
    want = expected[0]
    given = [float(v) for v in boxes[0].get_attribute("data-box").split(",")]
    assert given == pytest.approx([want.x1, want.y1, want.x2, want.y2], abs=1e-9)
    assert boxes[0].text == want.label == "the red circle"
    assert answer.find_element(By.CSS_SELECTOR, "figure img").get_attribute("alt") == \
        "shapes.png with 1 box drawn: the red circle"
    assert drawn_box(browser, boxes[0]) == pytest.approx([want.x1, want.y1, want.x2, want.y2], abs=2)
    screens(browser, "03-grounding-answer")

    browser.set_window_size(320, 640)  # a small phone: the image shrinks to fit, its box with it
    image_width = browser.execute_script(
        "return arguments[0].closest('figure').querySelector('img').getBoundingClientRect().width", boxes[0])
    assert image_width < 280
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 320  # nothing sticks out
    assert drawn_box(browser, boxes[0]) == pytest.approx([want.x1, want.y1, want.x2, want.y2], abs=2)
    browser.execute_script("arguments[0].scrollIntoView({block: 'end'})", answer.find_element(By.CSS_SELECTOR, "figure"))
    screens(browser, "04-phone-layout")

    browser.set_window_size(1100, 900)
    ask(browser, "Describe this image.")  # a second turn carries the first, image and answer included
    finished_answer(browser)
    first, second = browser.execute_script("return window.sentBodies")
    assert first["temperature"] == 0 and first["stream"] is True
    assert [message["role"] for message in second["messages"]] == ["user", "assistant", "user"]
    assert second["messages"][0] == first["messages"][0]
    assert second["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert second["messages"][1]["content"] == answer.find_element(By.CSS_SELECTOR, ".content").text
    assert len(browser.find_elements(By.CSS_SELECTOR, '[data-role="assistant"]')) == 2

    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, '[data-role="assistant"]') == []
    assert severe_console_messages(browser) == []


@needs_browser
def test_an_oversized_image_shows_the_servers_message_and_the_page_stays_usable(server, browser, screens, tmp_path):
    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("RGB", (800, 600), "white").save(big)
    open_page(browser, server)
    attach(browser, big)
    ask(browser, "Describe this image.")
    message = error_text(browser)
    assert "800x600" in message and f"over the limit of {MAX_IMAGE_PIXELS}" in message, message
    assert "messages[0].content[0]" in message
    assert browser.find_elements(By.CSS_SELECTOR, '[data-role="assistant"]') == []
    assert browser.find_element(By.CSS_SELECTOR, "textarea").get_attribute("value") == "Describe this image."
    screens(browser, "05-oversized-image")

    browser.find_element(By.CSS_SELECTOR, "#attachments .remove").click()  # the draft came back: fix it, resend
    attach(browser, SHAPES)
    change_settings(browser, max_tokens="16", max_pixels="100000")
    record_requests(browser)
    browser.find_element(By.CSS_SELECTOR, "textarea").send_keys(Keys.ENTER)
    answer = finished_answer(browser)
    assert answer.find_element(By.CSS_SELECTOR, ".content").text == "a red circle and a blue square"
    (sent,) = browser.execute_script("return window.sentBodies")
    assert len(sent["messages"]) == 1  # the refused turn left the history
    assert sent["max_tokens"] == 16 and "temperature" not in sent  # an empty setting: the server's default
    assert [part.get("max_pixels") for part in sent["messages"][0]["content"]] == [100000, None]


@needs_browser
def test_a_bad_key_is_refused_then_stop_ends_the_stream_on_the_server(keyed_server, browser, screens):
    open_page(browser, keyed_server)
    dialog = browser.find_element(By.ID, "key-dialog")
    assert dialog.is_displayed()
    key = browser.find_element(By.ID, "api-key")
    key.send_keys("wrong-key", Keys.ENTER)
    assert "incorrect API key" in error_text(browser)
    wait(browser, lambda d: dialog.is_displayed(), 10, "the key was not asked for again")
    screens(browser, "06-bad-key")
    key.clear()
    key.send_keys(API_KEY, Keys.ENTER)
    wait(browser, lambda d: d.find_element(By.ID, "model-name").text == MODEL.name, 10, "the right key was not used")
    assert browser.find_elements(By.CSS_SELECTOR, '[data-role="error"]') == []  # the key's error is resolved

    ask(browser, "Describe this image.")
    content = browser.find_element(By.CSS_SELECTOR, '[data-role="assistant"] .content')
    wait(browser, lambda d: len(content.text) > 20, 30, "the answer did not start")
    assert keyed_server.running_requests() == 1
    browser.find_element(By.ID, "stop").click()
    answer = finished_answer(browser, 10)
    assert answer.find_element(By.CSS_SELECTOR, ".stats").text.endswith("stopped")
    stopped_at = content.text
    wait(browser, lambda d: keyed_server.running_requests() == 0, 10, "the server still generates the stopped answer")
    assert content.text == stopped_at and len(stopped_at.split()) < LONG_ANSWER
    assert browser.find_element(By.ID, "send").is_displayed() and not browser.find_element(By.ID, "stop").is_displayed()
    screens(browser, "07-stopped")


@needs_browser
def test_a_dropped_connection_is_shown_and_the_page_stays_usable(keyed_server, browser, screens):
    browser.get(keyed_server.url)
    browser.execute_script("localStorage.setItem('qwen2vl.apiKey', arguments[0])", API_KEY)
    open_page(browser, keyed_server)
    ask(browser, "Describe this image.")
    content = browser.find_element(By.CSS_SELECTOR, '[data-role="assistant"] .content')
    wait(browser, lambda d: len(content.text) > 20, 30, "the answer did not start")
    keyed_server.process.kill()  # gone at once, as a crashed server or a lost network
    assert "connection to the server was lost" in error_text(browser)
    assert browser.find_element(By.CSS_SELECTOR, '[data-role="assistant"] .stats').text.endswith("interrupted")
    assert browser.find_element(By.ID, "send").is_displayed()
    screens(browser, "08-connection-lost")
    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, '[data-role="error"]') == []
    assert browser.find_element(By.CSS_SELECTOR, "textarea") == browser.switch_to.active_element


@needs_browser
def test_a_video_file_is_sent_and_answered(server, browser, screens, tmp_path):
    pytest.importorskip("av")
    from processor_reference import write_mp4

    from qwen2vl.evals.shapes import VIDEO_FRAMES, VIDEO_SIDE, Shape, draw

    frames = [draw([Shape("square", "green", 20 + 16 * i, 80, 50)], VIDEO_SIDE, VIDEO_SIDE) for i in range(VIDEO_FRAMES)]
    video = write_mp4(tmp_path / "moving.mp4", frames, fps=4)
    open_page(browser, server)
    attach(browser, video)
    ask(browser, "Which direction does the shape move?")
    answer = finished_answer(browser)
    assert answer.find_element(By.CSS_SELECTOR, ".content").text == "right"
    assert browser.find_element(By.CSS_SELECTOR, '[data-role="user"] video').get_attribute("aria-label") == \
        "Attached video moving.mp4"
    screens(browser, "09-video")


GROUNDING_TEXTS = [
    "<|object_ref_start|>the red circle<|object_ref_end|><|box_start|>(111,240),(330,600)<|box_end|>",
    "<|object_ref_start|>the squares<|object_ref_end|><|box_start|>(10,20),(30,40)<|box_end|> and "
    "<|box_start|>( 700 , 650 ),( 500.5 , 999 )<|box_end|>",  # the label carries on; corners in any order
    "<|box_start|>(0,0),(999,999)<|box_end|>; <|object_ref_start|>a blue square<|object_ref_end|>"
    "<|box_start|>(500,100),(620,330)<|box_end|>",  # a box before any reference has no label
]
# JSON answers (Qwen2.5-VL's and Qwen3-VL's form): a fenced list, a single object with prose after
# it, one cut short, and objects that are not boxes between good ones.
GROUNDING_JSON_TEXTS = [
    '```json\n[\n  {"bbox_2d": [504, 154, 1008, 308], "label": "the right half"},\n'
    '  {"bbox_2d": [378, 280, 126, 28], "label": " a cat "},\n  {"point_2d": [252, 77], "label": "the dot"}\n]\n```',
    '{"bbox_2d": [10, 20, 30.5, 40]} and the {rest} is {"prose": [1, 2]}',
    '[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6, 7, 8], "label": "b {\\"x\\"}"}, {"bbox_2d": [9, 1',
    '[{"bbox_2d": [1, 2, 3]}, {"bbox_2d": ["1", "2", "3", "4"]}, {"bbox_2d": [true, 2, 3, 4]}, '
    '{"bbox_2d": [NaN, 2, 3, 4]}, {"x": {"point_2d": [1.5, -2], "label": 7}}, {"bbox_2d": [1, 2, 3, 4], "s": Infinity}]',
    '{"bbox_2d": [1' + "0" * 400 + ', 2, 3, 4]} {"point_2d": [1e999, 2]} {"point_2d": [1, 2]}',
]


def _mark_tuple(mark) -> tuple:
    """A box or point, Python's or the page's, as (label, coordinates...)."""
    if isinstance(mark, dict):
        return (mark["label"], mark["x"], mark["y"]) if "x" in mark else \
            (mark["label"], mark["x1"], mark["y1"], mark["x2"], mark["y2"])
    return (mark.label, mark.x, mark.y) if hasattr(mark, "x") else (mark.label, mark.x1, mark.y1, mark.x2, mark.y2)


@needs_browser
@pytest.mark.parametrize("model_type, text", [("qwen2_vl", text) for text in GROUNDING_TEXTS]
                         + [(model_type, text) for model_type in ("qwen2_5_vl", "qwen3_vl") for text in GROUNDING_JSON_TEXTS])
def test_the_pages_box_parsing_and_scaling_is_grounding_pys(server, browser, model_type, text):
    """The page's parseBoxes + scaled, in the frame the server's X-Grounding header gives, against
    qwen2vl.grounding's parse_boxes + to_image; Qwen2-VL's tokens also as the server streams them
    (special tokens skipped). The image: 1000x300, seen by the model as 1008x308."""
    import re

    from qwen2vl.grounding import grounding_header, parse_boxes, to_image

    browser.get(server.url)
    size, resized = (1000, 300), (1008, 308)
    header = grounding_header(model_type, [(50, 40), size], [(56, 28), resized])  # the last image is the one
    want = [_mark_tuple(mark) for mark in to_image(parse_boxes(text, model_type), model_type, size, resized)]
    assert want
    streamed = re.sub(r"<\|[a-z_]+\|>", "", text)
    for given_text in (text, streamed):
        given = browser.execute_script(
            "const g = JSON.parse(arguments[1]);"
            "return parseBoxes(arguments[0], g.syntax).map((mark) => scaled(mark, arguments[2], arguments[3], frameOf(g)))",
            given_text, header, *size)
        assert [_mark_tuple(mark) for mark in given] == want, given_text


@needs_browser
def test_the_page_reads_every_cut_of_a_json_answer_as_grounding_py(server, browser):
    """A streamed JSON answer is read at every length it passes through: the page finds what
    qwen2vl.grounding finds in each prefix (no box from a half-written object, none lost)."""
    from qwen2vl.grounding import parse_boxes

    browser.get(server.url)
    text = "".join(GROUNDING_JSON_TEXTS)
    given = browser.execute_script(
        "const text = arguments[0], cuts = [];"
        "for (let end = 0; end <= text.length; end++) cuts.push(parseBoxes(text.slice(0, end), 'json'));"
        "return cuts;", text)
    assert len(given) == len(text) + 1
    for end, marks in enumerate(given):
        assert [_mark_tuple(mark) for mark in marks] == \
            [_mark_tuple(mark) for mark in parse_boxes(text[:end], "qwen3_vl")], text[:end]


@needs_browser
def test_the_page_draws_a_qwen2_5_vl_answers_boxes_and_points_where_completion_boxes_puts_them(server, browser):
    """A Qwen2.5-VL answer (JSON in pixels of the 1008x308 image the model saw) over the 1000x300
    image sent: each box's `data-box` and each point's `data-point` hold `Completion.boxes()`'s
    numbers, and they are drawn there."""
    import base64
    import io

    from PIL import Image

    from qwen2vl import Completion
    from qwen2vl.grounding import grounding_header

    size, resized, text = (1000, 300), (1008, 308), GROUNDING_JSON_TEXTS[0]
    right, cat, dot = Completion(text="", token_ids=[], finish_reason="stop", usage=None, raw_text=text,
                                 image_sizes=[size], resized_image_sizes=[resized], model_type="qwen2_5_vl").boxes()
    png = io.BytesIO()
    Image.new("RGB", size, "white").save(png, format="PNG")
    browser.get(server.url)
    browser.set_window_size(1400, 900)
    answer = browser.execute_script("""
        const image = {kind: "image", name: "wide.png", url: arguments[0], width: 1000, height: 300};
        const answer = addAssistantMessage(image);
        drawBoxes(answer.figure, image, arguments[1], JSON.parse(arguments[2]));
        return answer.node;
    """, "data:image/png;base64," + base64.b64encode(png.getvalue()).decode(), text,
        grounding_header("qwen2_5_vl", [size], [resized]))
    wait(browser, lambda driver: driver.execute_script("return arguments[0].querySelector('img').complete", answer))
    boxes = answer.find_elements(By.CSS_SELECTOR, "[data-box]")
    [point] = answer.find_elements(By.CSS_SELECTOR, "[data-point]")
    assert [[float(v) for v in box.get_attribute("data-box").split(",")] for box in boxes] == \
        [pytest.approx([want.x1, want.y1, want.x2, want.y2], abs=1e-9) for want in (right, cat)]
    assert [float(v) for v in point.get_attribute("data-point").split(",")] == pytest.approx([dot.x, dot.y], abs=1e-9)
    assert [box.text for box in boxes] + [point.text] == ["the right half", "a cat", "the dot"]
    assert answer.find_element(By.CSS_SELECTOR, "figure img").get_attribute("alt") == \
        "wide.png with 2 boxes and 1 point drawn: the right half, a cat, the dot"
    for box, want in zip(boxes, (right, cat)):
        assert drawn_box(browser, box) == pytest.approx([want.x1, want.y1, want.x2, want.y2], abs=2)
    x1, y1, x2, y2 = drawn_box(browser, point)
    assert ((x1 + x2) / 2, (y1 + y2) / 2) == pytest.approx((dot.x, dot.y), abs=2)


@needs_browser
def test_the_page_refuses_to_load_in_a_frame_of_another_origin(server, browser):
    frame = f"<iframe src='{server.url}'></iframe>".encode()

    class FramingPage(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(frame)

        def log_message(self, *args):
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FramingPage)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://localhost:{other.server_address[1]}/")  # another origin than 127.0.0.1's page
        browser.switch_to.frame(0)
        shown = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#message, body.neterror"), 30,
                     "the frame stayed empty")
        assert shown[0].tag_name == "body"  # the browser's error page, not the chat page's textarea
    finally:
        other.shutdown()


@needs_browser
def test_swagger_ui_renders_from_this_server_alone(server, browser, screens):
    """`serve --docs`: Swagger UI's files come from this server, under its strict policy, and it
    shows the API (no console errors: nothing the policy had to block)."""
    browser.get(server.url + "docs")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock"), 60, "Swagger UI showed no route")
    paths = {element.get_attribute("data-path") for element in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert "/v1/chat/completions" in paths
    origins = browser.execute_script("return performance.getEntriesByType('resource').map(r => new URL(r.name).origin)")
    assert set(origins) == {server.url.rstrip("/")}
    screens(browser, "09-swagger-ui")
    assert severe_console_messages(browser) == []
