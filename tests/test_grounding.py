from PIL import Image

from qwen2vl.grounding import Box, draw_boxes, parse_boxes


def test_parse_reference_and_box_scaled_to_pixels():
    text = ("<|object_ref_start|>the red circle<|object_ref_end|>"
            "<|box_start|>(107,255),(357,612)<|box_end|>")
    [box] = parse_boxes(text)
    assert box == Box("the red circle", 107, 255, 357, 612)
    assert box.scaled(280, 196) == Box("the red circle", 107 * 0.28, 255 * 0.196, 357 * 0.28, 612 * 0.196)


def test_several_boxes_labels_and_unlabelled_and_swapped_corners():
    text = ("<|box_start|>(10,20),(30,40)<|box_end|> and "
            "<|object_ref_start|>cats<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>"
            "<|box_start|>( 500 , 600 ),( 100 , 200 )<|box_end|> done")
    assert parse_boxes(text) == [
        Box(None, 10, 20, 30, 40),
        Box("cats", 1, 2, 3, 4),
        Box("cats", 100, 200, 500, 600),
    ]


def test_text_without_boxes_and_malformed_box():
    assert parse_boxes("a red circle") == []
    assert parse_boxes("<|box_start|>(1,2)<|box_end|>") == []


def test_draw_boxes_marks_the_box_outline():
    image = Image.new("RGB", (100, 80), "white")
    out = draw_boxes(image, [Box("x", 10, 10, 50, 40)])
    assert out.size == image.size
    assert out.getpixel((10, 25)) == (255, 0, 0)
    assert out.getpixel((30, 25)) == (255, 255, 255)
    assert image.getpixel((10, 25)) == (255, 255, 255)  # the input is left untouched


# --- each family's format ---------------------------------------------------------------------
#
# The image of these tests is 1000x300: Qwen2-VL and Qwen2.5-VL (28-pixel factor) see it resized
# to 1008x308 (round(1000/28) = 36, round(300/28) = 11 patches), Qwen3-VL (32-pixel factor) to
# 992x288 (round(31.25) = 31, round(9.375) = 9): the aspect changes (3.27 and 3.44 for 3.33), so a
# box read in the wrong frame lands in the wrong place.

import json  # noqa: E402

import pytest  # noqa: E402

from qwen2vl import Completion, InputError  # noqa: E402
from qwen2vl.grounding import GROUNDING_FORMATS, Point, grounding_format, grounding_header, to_image  # noqa: E402

ORIGINAL = (1000, 300)
RESIZED_28 = (1008, 308)
RESIZED_32 = (992, 288)

QWEN2_5_ANSWER = """Here they are:
```json
[
  {"bbox_2d": [504, 154, 1008, 308], "label": "the right half"},
  {"bbox_2d": [378, 280, 126, 28], "label": "a cat"},
  {"point_2d": [252, 77], "label": "the dot"}
]
```"""

QWEN3_ANSWER = """```json
[
  {"bbox_2d": [500, 500, 1000, 1000], "label": "the right half"},
  {"point_2d": [250, 250], "label": "the dot"}
]
```"""


def test_the_format_is_the_architectures():
    assert grounding_format("qwen2_vl") == GROUNDING_FORMATS["qwen2_vl"]
    assert (grounding_format("qwen2_vl").syntax, grounding_format("qwen2_vl").frame) == ("tokens", "normalized")
    assert (grounding_format("qwen2_5_vl").syntax, grounding_format("qwen2_5_vl").frame) == ("json", "resized")
    for model_type in ("qwen3_vl", "qwen3_vl_moe"):
        assert (grounding_format(model_type).syntax, grounding_format(model_type).frame) == ("json", "normalized")
    with pytest.raises(ValueError, match=r"model_type 'llava'.*known: qwen2_vl, qwen2_5_vl, qwen3_vl"):
        grounding_format("llava")


def test_every_registered_architecture_has_a_grounding_format():
    from qwen2vl.model.registry import ARCHITECTURES

    assert set(ARCHITECTURES) <= set(GROUNDING_FORMATS)


def test_qwen2_vl_tokens_map_to_the_original_by_scaling():
    text = "<|object_ref_start|>the right half<|object_ref_end|><|box_start|>(500,500),(1000,1000)<|box_end|>"
    [box] = parse_boxes(text, "qwen2_vl")
    assert to_image([box], "qwen2_vl", ORIGINAL, RESIZED_28) == [Box("the right half", 500, 150, 1000, 300)]
    assert parse_boxes(QWEN2_5_ANSWER, "qwen2_vl") == []  # each family reads its own format only
    assert parse_boxes(text, "qwen2_5_vl") == parse_boxes(text, "qwen3_vl") == []


def test_qwen2_5_vl_json_is_in_pixels_of_the_resized_image():
    marks = parse_boxes(QWEN2_5_ANSWER, "qwen2_5_vl")
    assert marks == [Box("the right half", 504, 154, 1008, 308), Box("a cat", 126, 28, 378, 280),
                     Point("the dot", 252, 77)]
    # x * 1000 / 1008, y * 300 / 308: 504 -> 500, 154 -> 150, 126 -> 125, 378 -> 375,
    # 28 -> 8400 / 308 = 300 / 11, 280 -> 84000 / 308 = 3000 / 11, 252 -> 250, 77 -> 75
    right, cat, dot = to_image(marks, "qwen2_5_vl", ORIGINAL, RESIZED_28)
    assert right == Box("the right half", 500, 150, 1000, 300)
    assert (cat.label, cat.x1, cat.x2) == ("a cat", 125, 375)
    assert (cat.y1, cat.y2) == (pytest.approx(300 / 11, rel=1e-12), pytest.approx(3000 / 11, rel=1e-12))
    assert dot == Point("the dot", 250, 75)
    with pytest.raises(ValueError, match="resized size is needed"):
        to_image(marks, "qwen2_5_vl", ORIGINAL, None)


def test_qwen3_vl_json_is_in_thousandths_of_the_image():
    for model_type in ("qwen3_vl", "qwen3_vl_moe"):
        marks = parse_boxes(QWEN3_ANSWER, model_type)
        assert marks == [Box("the right half", 500, 500, 1000, 1000), Point("the dot", 250, 250)]
        assert to_image(marks, model_type, ORIGINAL, RESIZED_32) == [
            Box("the right half", 500, 150, 1000, 300), Point("the dot", 250, 75)]


@pytest.mark.parametrize("text, want", [
    ('{"bbox_2d": [10, 20, 30, 40], "label": "cat"}', [Box("cat", 10, 20, 30, 40)]),  # one object, no fence
    ('```json\n{"point_2d": [5, 6]}\n```', [Point(None, 5, 6)]),  # no label
    # cut short: the boxes before the cut are read, the one cut is skipped
    ('```json\n[\n  {"bbox_2d": [1, 2, 3, 4], "label": "a"},\n  {"bbox_2d": [5, 6, 7, 8], "label": "b"},\n'
     '  {"bbox_2d": [9, 10, 1', [Box("a", 1, 2, 3, 4), Box("b", 5, 6, 7, 8)]),
    ('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6, 7, 8], "lab', [Box("a", 1, 2, 3, 4)]),
    # prose after the fence, with braces of its own
    ('```json\n[{"bbox_2d": [1, 2, 3, 4], "label": " a "}]\n```\nThe {cat} is {"left": true}.', [Box("a", 1, 2, 3, 4)]),
    # not boxes: wrong counts, strings, booleans, NaN, nulls, other keys; the good one between them is read
    ('[{"bbox_2d": [1, 2, 3]}, {"bbox_2d": ["1", "2", "3", "4"]}, {"bbox_2d": [true, 2, 3, 4]}, '
     '{"bbox_2d": [NaN, 2, 3, 4]}, {"point_2d": null}, {"box": [1, 2, 3, 4]}, {"point_2d": [1.5, -2], "label": 7}]',
     [Point(None, 1.5, -2)]),
    # boxes nested in another object are found; corners in any order
    ('{"objects": [{"bbox_2d": [30, 40, 10, 20], "label": "x"}], "count": 1}', [Box("x", 10, 20, 30, 40)]),
    ('{"a": {"bbox_2d": [1, 2, 3, 4], "label": "{ not } json ["}}', [Box("{ not } json [", 1, 2, 3, 4)]),
    ('{"bbox_2d": [1' + "0" * 400 + ', 2, 3, 4]} {"point_2d": [1e999, 2]} {"point_2d": [1, 2]}',
     [Point(None, 1, 2)]),  # numbers too large for a float
    ("no boxes here", []),
    ("{{{{ [[[ }}} ]] {\"bbox_2d\": [1, 2, 3, 4]", []),
    ('{"a": ' + "[" * 100_000, []),  # nesting too deep to parse
])
def test_json_answers_read_every_well_formed_box_and_point(text, want):
    assert parse_boxes(text, "qwen3_vl") == parse_boxes(text, "qwen2_5_vl") == want


def test_every_cut_of_a_json_answer_reads_the_boxes_before_the_cut():
    full = parse_boxes(QWEN2_5_ANSWER, "qwen2_5_vl")
    for end in range(len(QWEN2_5_ANSWER) + 1):
        marks = parse_boxes(QWEN2_5_ANSWER[:end], "qwen2_5_vl")
        assert marks == full[:len(marks)], end


def test_no_model_text_raises():
    import random

    rng = random.Random(0)
    pieces = ['{', '}', '[', ']', '"', ':', ',', ' ', '\\', '-', '.', 'e', '1', '99', '1e999', 'NaN', 'true', 'null',
              '"bbox_2d"', '"point_2d"', '"label"', '```json\n', '<|box_start|>', '(1,2),(3,4)', '<|box_end|>']
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(40)))
        for model_type in GROUNDING_FORMATS:
            assert isinstance(parse_boxes(text, model_type), list)


def test_draw_boxes_marks_a_point():
    image = Image.new("RGB", (300, 300), "white")
    out = draw_boxes(image, [Point("dot", 100, 50)])
    # a ring of radius 3 * the line width (300 / 150 = 2) around it: x 94..106, 2 pixels thick
    assert out.getpixel((94, 50)) == out.getpixel((105, 50)) == (255, 0, 0)
    assert out.getpixel((100, 50)) == out.getpixel((107, 50)) == (255, 255, 255)


def test_the_grounding_header_gives_the_format_and_sizes():
    header = json.loads(grounding_header("qwen2_5_vl", [(50, 40), ORIGINAL], [(56, 28), RESIZED_28]))
    assert header == {"syntax": "json", "frame": "resized", "images": [
        {"width": 50, "height": 40, "resized_width": 56, "resized_height": 28},
        {"width": 1000, "height": 300, "resized_width": 1008, "resized_height": 308}]}


# --- Completion.boxes() with stand-in answers ---------------------------------------------------

def completion(raw_text: str, model_type: str, sizes, resized) -> Completion:
    return Completion(text="", token_ids=[], finish_reason="stop", usage=None, raw_text=raw_text,
                      image_sizes=sizes, resized_image_sizes=resized, model_type=model_type)


def test_completion_boxes_for_each_family_on_the_last_image():
    first = (50, 40), (56, 28)  # another image before the one the question is about
    tokens = completion("<|box_start|>(500,500),(1000,1000)<|box_end|>", "qwen2_vl",
                        [first[0], ORIGINAL], [first[1], RESIZED_28])
    assert tokens.boxes() == [Box(None, 500, 150, 1000, 300)]
    assert tokens.boxes(image_index=0) == [Box(None, 25, 20, 50, 40)]

    pixels = completion(QWEN2_5_ANSWER, "qwen2_5_vl", [first[0], ORIGINAL], [first[1], RESIZED_28])
    right, cat, dot = pixels.boxes()
    assert (right, dot) == (Box("the right half", 500, 150, 1000, 300), Point("the dot", 250, 75))
    assert (cat.x1, cat.y1, cat.x2, cat.y2) == pytest.approx((125, 300 / 11, 375, 3000 / 11), rel=1e-12)
    assert pixels.boxes(image_index=-1) == pixels.boxes(image_index=1) == pixels.boxes()
    # on the first image (56x28 as seen): 504 * 50 / 56 = 450, 154 * 40 / 28 = 220
    assert pixels.boxes(image_index=0)[0] == Box("the right half", 450, 220, 900, 440)

    thousandths = completion(QWEN3_ANSWER, "qwen3_vl", [ORIGINAL], [RESIZED_32])
    assert thousandths.boxes() == [Box("the right half", 500, 150, 1000, 300), Point("the dot", 250, 75)]
    with pytest.raises(InputError, match="image_index 1: the conversation has 1 image"):
        thousandths.boxes(image_index=1)


def test_completion_boxes_without_an_image_stay_in_the_models_coordinates():
    assert completion(QWEN2_5_ANSWER, "qwen2_5_vl", [], []).boxes()[0] == Box("the right half", 504, 154, 1008, 308)


# --- the processor's resize, recorded ------------------------------------------------------------

@pytest.fixture(scope="module")
def wide_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("grounding") / "wide.png"
    Image.new("RGB", ORIGINAL, (200, 30, 30)).save(path)
    return str(path)


def ask(image: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Where?"}]}]


@pytest.mark.parametrize("patch_size, resized", [(14, RESIZED_28), (16, RESIZED_32)])
def test_the_processor_records_each_images_resize(tmp_path, wide_image, patch_size, resized):
    from qwen2vl import Processor
    from qwen2vl.tools.random_checkpoint import write_support_files

    write_support_files(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**config, "patch_size": patch_size}))
    [item] = Processor.from_pretrained(tmp_path).prepare(ask(wide_image)).vision_items
    assert (item.original_size, item.resized_size) == (ORIGINAL, resized)


@pytest.fixture(scope="module")
def qwen2_5_ckpt(tmp_path_factory):
    from checkpoints import write_tiny_checkpoint_2_5

    return write_tiny_checkpoint_2_5(tmp_path_factory.mktemp("tiny-2.5"))


@pytest.fixture
def answers_with(monkeypatch):
    """Every answer's raw text replaced by `text` (what a real Qwen2.5-VL would write); the rest
    of the completion (its image sizes, its architecture) is the engine's."""
    import dataclasses

    from qwen2vl import Qwen2VL

    def replace(text: str) -> None:
        completion_of = Qwen2VL._completion
        monkeypatch.setattr(Qwen2VL, "_completion",
                            lambda self, prompt, output: dataclasses.replace(completion_of(self, prompt, output),
                                                                             raw_text=text))
    return replace


def test_a_qwen2_5_vl_chat_maps_its_boxes_through_the_recorded_resize(qwen2_5_ckpt, wide_image, answers_with):
    from qwen2vl import Qwen2VL

    answers_with(QWEN2_5_ANSWER)
    llm = Qwen2VL.from_pretrained(qwen2_5_ckpt, device="cpu", max_model_len=1024)
    answer = llm.chat(ask(wide_image), temperature=0, max_tokens=1)
    assert (answer.model_type, answer.image_sizes, answer.resized_image_sizes) == ("qwen2_5_vl", [ORIGINAL], [RESIZED_28])
    assert answer.boxes()[0] == Box("the right half", 500, 150, 1000, 300)
    assert answer.boxes()[2] == Point("the dot", 250, 75)


def test_draw_boxes_on_a_qwen2_5_vl_answer(qwen2_5_ckpt, wide_image, answers_with, tmp_path, capsys):
    from qwen2vl.cli import main

    answers_with(QWEN2_5_ANSWER)
    out = tmp_path / "boxes.png"
    assert main(["chat", "--model", str(qwen2_5_ckpt), "--device", "cpu", "--image", wide_image,
                 "--temperature", "0", "--max-tokens", "1", "--draw-boxes", str(out), "Where?"]) == 0
    err = capsys.readouterr().err
    assert "box the right half (500,150),(1000,300)" in err
    assert "box a cat (125,27),(375,273)" in err
    assert "point the dot (250,75)" in err
    assert "[3 box(es) drawn to" in err
    drawn = Image.open(out)
    assert drawn.size == ORIGINAL
    # line width round(300 / 150) = 2: the right half's left edge at x = 500, its inside untouched
    assert drawn.getpixel((500, 200)) == (255, 0, 0) and drawn.getpixel((700, 200)) == (200, 30, 30)
    assert drawn.getpixel((125, 150)) == (255, 0, 0)  # the cat's left edge, mapped; unmapped it would be at 126
    assert drawn.getpixel((127, 150)) == (200, 30, 30)


def test_the_server_tells_the_page_how_to_place_the_boxes(qwen2_5_ckpt, wide_image):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from qwen2vl import Qwen2VL
    from qwen2vl.server import create_app

    import base64
    from pathlib import Path

    app = create_app(Qwen2VL.from_pretrained(qwen2_5_ckpt, device="cpu", max_model_len=1024), model_name="tiny")
    url = "data:image/png;base64," + base64.b64encode(Path(wide_image).read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "Where?"}]}]
    want = {"syntax": "json", "frame": "resized", "images": [
        {"width": 1000, "height": 300, "resized_width": 1008, "resized_height": 308}]}
    with TestClient(app) as client:
        for stream in (False, True):
            reply = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1, "stream": stream})
            assert reply.status_code == 200, reply.text
            assert json.loads(reply.headers["X-Grounding"]) == want
        text_only = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                               "max_tokens": 1})
        assert json.loads(text_only.headers["X-Grounding"]) == {"syntax": "json", "frame": "resized", "images": []}


def test_a_thinking_models_boxes_are_read_from_its_answer_not_its_reasoning():
    reasoning = 'The cat might be at {"bbox_2d": [0, 0, 10, 10], "label": "guess"}.'
    answer = completion(f"{reasoning}\n</think>\n\n{QWEN3_ANSWER}", "qwen3_vl", [ORIGINAL], [RESIZED_32])
    answer.reasoning = reasoning
    assert answer.boxes() == [Box("the right half", 500, 150, 1000, 300), Point("the dot", 250, 75)]
