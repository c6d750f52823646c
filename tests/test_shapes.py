"""The synthetic shapes task: deterministic, and its answers right on hand-checked cases."""
import json
import math
import random

import pytest

from answers import box_gap
from qwen2vl.cli import main
from qwen2vl.evals.shapes import (
    COLORS,
    MAX_BOX,
    MIN_BOX,
    TASKS,
    Sample,
    Shape,
    describe,
    draw,
    ground_answer,
    iou,
    is_correct,
    make_sample,
    make_samples,
    normalized_box,
)


@pytest.fixture(scope="module")
def samples():
    return make_samples(30, seed=11)


def _images(sample):
    return [part.get("image") or part.get("video") for part in sample.messages[0]["content"] if part["type"] != "text"]


def test_same_seed_same_samples():
    first, second = make_samples(4, seed=3), make_samples(4, seed=3)
    assert [s.answer for s in first] == [s.answer for s in second]
    for a, b in zip(first, second):
        for image_a, image_b in zip(_images(a), _images(b)):
            frames_a = image_a if isinstance(image_a, list) else [image_a]
            frames_b = image_b if isinstance(image_b, list) else [image_b]
            assert [f.tobytes() for f in frames_a] == [f.tobytes() for f in frames_b]
    assert [s.answer for s in make_samples(4, seed=4)] != [s.answer for s in first]


def test_tasks_interleaved_with_their_prompts(samples):
    assert [s.task for s in samples[:7]] == list(TASKS)
    texts = {s.task: s.messages[0]["content"][-1]["text"] for s in samples[:7]}
    assert texts["shape"] == "What shape is in the image?"
    assert texts["color"] == "What color is the shape?"
    assert texts["count"] == "How many shapes are there?"
    assert texts["describe"] == "Describe this image."
    assert texts["compare"] == "Are the shapes in the two images the same color?"
    assert texts["direction"] == "Which direction does the shape move?"
    assert texts["ground"].startswith("Where is the ")


def test_description_lists_shapes_left_to_right():
    red_circle = Shape("circle", "red", 10, 80, 30)
    blue_square = Shape("square", "blue", 100, 5, 40)
    green_triangle = Shape("triangle", "green", 60, 60, 28)
    assert describe([red_circle]) == "a red circle"
    assert describe([blue_square, red_circle]) == "a red circle and a blue square"
    assert describe([blue_square, green_triangle, red_circle]) == \
        "a red circle, a green triangle and a blue square"
    purple = Shape("circle", "purple", 200, 0, 28)
    assert describe([purple, blue_square, green_triangle, red_circle]) == \
        "a red circle, a green triangle, a blue square and a purple circle"


def test_box_normalized_to_thousandths_below_1000():
    assert normalized_box((28, 56, 84, 112), 280, 224) == (100, 250, 300, 500)
    assert normalized_box((0, 0, 112, 150), 112, 300) == (0, 0, 999, 500)
    assert normalized_box((1, 1, 2, 2), 3, 3) == (333, 333, 666, 666)
    assert ground_answer("red circle", (100, 250, 300, 500)) == (
        "<|object_ref_start|>the red circle<|object_ref_end|><|box_start|>(100,250),(300,500)<|box_end|>")


def test_layouts_fit_and_never_overlap(samples):
    for sample in samples:
        for shape in sample.shapes:
            assert MIN_BOX <= shape.size <= MAX_BOX and shape.color in COLORS
        if sample.task in ("shape", "color", "count", "describe", "ground"):
            image = _images(sample)[0]
            assert 112 <= image.width <= 336 and 112 <= image.height <= 336
            for i, a in enumerate(sample.shapes):
                assert a.x >= 0 and a.y >= 0 and a.x + a.size <= image.width and a.y + a.size <= image.height
                for b in sample.shapes[i + 1:]:
                    assert iou(a.box, b.box) == 0.0


def test_answers_match_the_drawn_shapes(samples):
    for sample in samples:
        if sample.task == "count":
            assert sample.answer == str(len(sample.shapes))
        elif sample.task == "shape":
            assert len(sample.shapes) == 1 and sample.answer == sample.shapes[0].kind
        elif sample.task == "color":
            shape = sample.shapes[0]
            assert sample.answer == shape.color
            # The centre of every shape (also the triangle's) is painted in its colour.
            center = (shape.x + shape.size // 2, shape.y + shape.size * 2 // 3)
            assert _images(sample)[0].getpixel(center) == COLORS[shape.color]
            assert _images(sample)[0].getpixel((0, 0)) == (255, 255, 255) or shape.x == 0 or shape.y == 0
        elif sample.task == "ground":
            names = [shape.name for shape in sample.shapes]
            label = sample.answer.split("the ", 1)[1].split("<", 1)[0]
            assert names.count(label) == 1
            assert all(0 <= v < 1000 for v in sample.box)
        elif sample.task == "compare":
            same = sample.shapes[0].color == sample.shapes[1].color
            assert sample.answer == ("yes" if same else "no") and len(_images(sample)) == 2
        elif sample.task == "direction":
            frames = _images(sample)[0]
            assert len(frames) == 8 and frames[0].size == (224, 224)
            first, last = (_leftmost_colored_column(f) for f in (frames[0], frames[-1]))
            assert sample.answer == ("right" if last > first else "left")


def _leftmost_colored_column(image):
    width, height = image.size
    return min(x for x in range(width) for y in range(0, height, 2) if image.getpixel((x, y)) != (255, 255, 255))


def test_compare_answers_are_balanced():
    rng = random.Random(0)
    answers = [make_sample("compare", rng).answer for _ in range(200)]
    assert 70 < answers.count("yes") < 130


def test_scoring():
    text = Sample("shape", [], "circle")
    assert is_correct(text, "circle<|im_end|>") and is_correct(text, " Circle")
    assert not is_correct(text, "square") and not is_correct(text, "circle circle")
    ground = Sample("ground", [], ground_answer("red circle", (100, 100, 300, 300)), (100, 100, 300, 300))
    assert is_correct(ground, ground.answer)
    # IoU of (150,100)-(350,300) with the true box: 150*200 / (2*200*200 - 150*200) = 0.6
    assert is_correct(ground, ground_answer("red circle", (150, 100, 350, 300)))
    # (200,100)-(400,300): 100*200 / (80000 - 20000) = 0.33
    assert not is_correct(ground, ground_answer("red circle", (200, 100, 400, 300)))
    assert not is_correct(ground, "the red circle")
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)


def test_drawn_shapes_have_their_geometry():
    image = draw([Shape("triangle", "black", 0, 0, 40), Shape("circle", "blue", 50, 0, 40)], 112, 112)
    assert image.getpixel((20, 1)) == COLORS["black"]  # apex at the top middle
    assert image.getpixel((1, 1)) == (255, 255, 255)  # a triangle pointing up leaves the top corners white
    assert image.getpixel((1, 38)) == COLORS["black"]  # and fills the bottom ones
    assert image.getpixel((51, 1)) == (255, 255, 255)  # a circle leaves its box corners white
    assert image.getpixel((70, 20)) == COLORS["blue"]


def test_cli_eval_reports_every_prompt_type(tiny_ckpt, tmp_path, capsys):
    counts = tmp_path / "counts.json"
    assert main(["eval", str(tiny_ckpt), "--n", "2", "--only", "count", "--only", "compare",
                 "--json", str(counts)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["task", "accuracy", "correct"]
    assert [line.split()[0] for line in table.splitlines()[1:]] == ["count", "compare", "mean"]
    assert {task: c["total"] for task, c in json.loads(counts.read_text()).items()} == {"count": 1, "compare": 1}


def test_box_gap_tells_apart_box_digits_from_other_differences():
    box = "<|object_ref_start|>the red circle<|object_ref_end|><|box_start|>(515,400),(990,900)<|box_end|>"
    assert box_gap(box, box) == 0
    assert box_gap(box, box.replace("990", "995")) == 5
    assert box_gap(box, box.replace("400", "100")) == 300
    assert box_gap(box, box.replace("red", "blue")) == math.inf
    assert box_gap("3", "4") == math.inf
