"""scripts/train_demo.py on a micro architecture: the loss falls and the saved checkpoint is
what our engine runs."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from qwen2vl import Qwen2VL
from qwen2vl.evals.shapes import make_samples

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_demo.py"


@pytest.fixture(scope="module")
def train_demo():
    spec = importlib.util.spec_from_file_location("train_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(train_demo, tmp_path_factory):
    """A micro model after a few steps on one fixed batch, saved; with its losses."""
    out = tmp_path_factory.mktemp("micro")
    train_demo.write_support_files(out)
    processor = train_demo.demo_processor(out)
    samples = make_samples(1, seed=5)
    step = train_demo.micro_batches([train_demo.encode(processor, s) for s in samples])
    vocab = train_demo.task_vocabulary(processor, seed=1)
    model = train_demo.build_model(train_demo.MICRO_ARCH, seed=0, task_vocab=vocab)
    losses = train_demo.train(model, [step] * 8, steps=8, seed=0, lr=2e-2, log=None)
    train_demo.save_checkpoint(model, train_demo.MICRO_ARCH, out)
    return model, out, losses, samples, processor


def test_a_few_steps_reduce_the_loss(trained):
    _, _, losses, _, _ = trained
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 1.0, losses


def test_task_softmax_equals_the_full_one_over_the_saved_table(train_demo, trained):
    model, _, _, samples, processor = trained
    batch = train_demo.collate([train_demo.encode(processor, s) for s in samples[:3]])
    with torch.no_grad():
        loss, _ = train_demo.answer_loss(model, batch)
        hidden = model.model(**batch.inputs, use_cache=False).last_hidden_state.flatten(0, 1)[batch.rows]
        table = model.get_input_embeddings().full_table()
        # float64: a float32 softmax over 151936 logits is itself off by ~1e-5
        full = (torch.nn.functional.cross_entropy(hidden.double() @ table.double().T, batch.targets, reduction="none")
                * batch.weights).sum()
        assert torch.equal(model.get_input_embeddings()(batch.inputs["input_ids"]), table[batch.inputs["input_ids"]])
    assert (table.abs().sum(-1) > 0).sum() == len(model.get_input_embeddings().task_vocab)
    assert loss.item() == pytest.approx(full.item(), rel=1e-5)


def test_an_answer_token_outside_the_task_vocabulary_is_named(train_demo, trained):
    model, *_ = trained
    with pytest.raises(ValueError, match="151643"):
        model.get_input_embeddings().label(torch.tensor([151643]))


def test_the_patch_projection_is_the_convolution(train_demo, trained):
    model, *_ = trained
    weight = model.model.visual.patch_embed.proj.weight
    patches = torch.randn(5, weight[0].numel())
    convolved = torch.nn.functional.conv3d(patches.view(5, *weight.shape[1:]), weight).flatten(1)
    torch.testing.assert_close(model.model.visual.patch_embed.proj(patches), convolved)


def test_answer_rows_predict_the_answer_tokens(train_demo, trained):
    *_, samples, processor = trained
    example = train_demo.encode(processor, samples[0])
    batch = train_demo.collate([example])
    rows, targets, weights = batch.rows, batch.targets, batch.weights
    answer = processor.tokenizer.encode(samples[0].answer) + [processor.tokenizer.token_to_id("<|im_end|>")]
    assert targets.tolist() == answer
    assert weights.sum().item() == pytest.approx(len(answer) ** 0.5)  # a long answer weighs sqrt(its length)
    assert rows.tolist() == list(range(example["answer_start"] - 1, len(example["ids"]) - 1))
    # Answer positions continue the prompt's text positions on all three M-RoPE axes.
    positions = example["positions"][:, example["answer_start"]:]
    assert (positions[0] == positions[1]).all() and (positions[0] == positions[2]).all()


def test_saved_checkpoint_runs_in_our_engine_like_transformers(train_demo, trained):
    model, out, _, samples, processor = trained
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    assert preprocessor["max_pixels"] == train_demo.DEMO_MAX_PIXELS
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 151936 and config["tie_word_embeddings"]
    llm = Qwen2VL.from_pretrained(out, device="cpu", dtype="float32")
    answers = llm.chat([s.messages for s in samples], temperature=0.0, max_tokens=1, logprobs=3)
    # transformers reading the saved (bf16) checkpoint; not the trained module cast to bf16 and
    # back, which would also round its rotary inverse frequencies.
    from transformers import Qwen2VLForConditionalGeneration

    saved = Qwen2VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.equal(saved.model.language_model.embed_tokens.weight, model.get_input_embeddings().full_table().bfloat16().float())
    model = saved
    for sample, answer in zip(samples, answers):
        example = train_demo.encode(processor, sample)
        inputs = train_demo.collate([example]).inputs
        with torch.no_grad():
            hidden = model.model(**inputs, use_cache=False).last_hidden_state[0, example["answer_start"] - 1]
            logprobs = torch.log_softmax(hidden @ model.get_input_embeddings().weight.T, dim=-1)
        expected = logprobs.topk(3)
        assert answer.token_ids[0] == expected.indices[0].item()
        for token, value in zip(expected.indices.tolist(), expected.values.tolist()):
            assert answer.logprobs[0][token] == pytest.approx(value, abs=1e-4)


def test_micro_batches_split_video_from_images_and_weigh_the_whole_step(train_demo, trained):
    *_, samples, processor = trained
    examples = [train_demo.encode(processor, s) for s in samples]
    video, images = train_demo.micro_batches(examples)
    assert "pixel_values_videos" in video.inputs and "pixel_values_videos" not in images.inputs
    assert len(video.inputs["input_ids"]) == 1 and len(images.inputs["input_ids"]) == len(samples) - 1
    assert video.share + images.share == pytest.approx(1.0) and video.share == pytest.approx(1 / len(samples))
    answer_lengths = [len(e["ids"]) - e["answer_start"] for e in examples]
    assert video.weights.sum().item() == pytest.approx(answer_lengths[-1] ** 0.5 / len(samples))


def test_token_targets_mark_the_cells_each_shape_covers(train_demo):
    from qwen2vl.evals.shapes import Shape
    from qwen2vl.processor.types import VisionItem

    # A 112x56 image kept at its size: 8x4 patches, 4x2 visual tokens of 28x28 pixels.
    item = VisionItem("image", torch.zeros(32, 1176), (1, 4, 8), (112, 56), (112, 56))
    red_square = Shape("square", "red", x=30, y=2, size=40)  # cells (0,1), (0,2), (1,1), (1,2)
    targets = train_demo.token_targets(item, [red_square])
    assert targets.shape == (8, 14)
    colors = targets[:, 0].view(2, 4)
    red, square = train_demo.COLOR_IDS["red"], train_demo.SHAPE_IDS["square"]
    assert colors.tolist() == [[0, red, red, 0], [0, red, red, 0]]
    assert targets[:, 1].view(2, 4)[0, 1].item() == square
    # Box edges relative to the cell of token (0, 1), whose left edge is x=28: (30-28)/28 ...
    assert targets[1, 2:6].tolist() == pytest.approx([2 / 28, 2 / 28, 42 / 28, 42 / 28])
    # Each token's centre and the covering box, normalized to the image's width and height; the
    # covering shape's index (-1: background) and place left to right (0: background).
    assert targets[1, 6:].tolist() == pytest.approx([42 / 112, 14 / 56, 30 / 112, 2 / 56, 70 / 112, 42 / 56, 0, 1])
    assert targets[0].tolist() == pytest.approx([0] * 6 + [14 / 112, 14 / 56] + [0] * 4 + [-1, 0])
    # A second shape further left comes first: places follow the left edges, not the list.
    blue_dot = Shape("circle", "blue", x=0, y=30, size=20)  # cell (1, 0)
    pair = train_demo.token_targets(item, [red_square, blue_dot])
    assert pair[:, 12:].tolist()[4] == [1, 1] and pair[:, 12:].tolist()[1] == [0, 2]
    # Half the image's resolution: same cells in tokens, edges halved in pixels.
    small = VisionItem("image", torch.zeros(32, 1176), (1, 4, 8), (224, 112), (112, 56))
    big_square = Shape("square", "red", x=60, y=4, size=80)
    torch.testing.assert_close(train_demo.token_targets(small, [big_square]), targets)


def test_box_digits_look_at_the_named_shape_and_know_their_place(train_demo):
    import random

    from qwen2vl.evals.shapes import make_sample

    processor = train_demo.demo_processor(Path(__file__).resolve().parent.parent / "models" / "qwen2-vl-shapes-demo")
    rng = random.Random(3)
    sample = next(s for s in iter(lambda: make_sample("ground", rng), None) if len(s.shapes) >= 2)
    example = train_demo.encode(processor, sample)
    ids, looks, digits = example["ids"], example["attention_targets"], example["digit_targets"]
    words = [processor.tokenizer.decode([ids[row + 1]]) for row, _, _ in looks]
    assert "".join(words) == "".join(str(v) for v in sample.box)  # every digit of the box, in order
    assert [row for row, _ in digits] == [row for row, _, _ in looks]
    x1 = sample.box[0]
    assert digits[0][1] == pytest.approx(x1 / 10 ** (len(str(x1)) - 1))  # 465 -> 4.65 before the "4"
    target = next(s for s in sample.shapes if f"the {s.name}<" in sample.answer)
    row, keys, shape = looks[0]
    assert all(ids[k] == train_demo.IMAGE_TOKEN_ID for k in keys) and row >= example["answer_start"] - 1
    assert shape[:2].tolist() == [train_demo.COLOR_IDS[target.color], train_demo.SHAPE_IDS[target.kind]]
    assert shape[2:6].tolist() == pytest.approx([v / 1000 for v in sample.box], abs=0.01)
    assert shape[6] == -1  # a box's digits name no place: they find the shape by its name
    # a description's colour and shape words look at the shapes they name, left to right
    described = next(s for s in iter(lambda: make_sample("describe", rng), None) if len(s.shapes) == 3)
    looks = train_demo.encode(processor, described)["attention_targets"]
    colors = [train_demo.COLOR_IDS[s.color] for s in sorted(described.shapes, key=lambda s: (s.x, s.y))]
    assert [int(shape[0]) for _, _, shape in looks] == [c for c in colors for _ in range(2)]
    assert [int(shape[6]) for _, _, shape in looks] == [1, 1, 2, 2, 3, 3]  # and know which place they name
