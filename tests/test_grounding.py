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
