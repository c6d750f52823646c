"""Train the bundled demo model: a tiny Qwen2-VL on the synthetic shapes task.

    .venv/bin/python scripts/train_demo.py --out models/qwen2-vl-shapes-demo [--steps N] [--seed S]

The architecture is exactly Qwen2-VL (transformers' `Qwen2VLForConditionalGeneration` is the
training module; our engine loads the result). The vocabulary is the real tokenizer's 151936
tokens, so the tied embedding table dominates the size: hidden size 64 keeps the bf16 checkpoint
under 25 MB. Inputs come from our own `Processor` (the same ids, pixels and M-RoPE positions the
engine will see); only the answer tokens and the closing <|im_end|> are in the loss, plus
auxiliary losses through read-out heads that are not saved: on the image tokens
(`token_targets`), on where one attention head of the answer rows looks (`attention_targets`)
and on what those rows carry (`AuxHeads.answer_loss`, `digit_targets`). Every sample is fresh
(drawn from a seeded generator), so there is no overfitting to watch for. Reproducible for a
given seed, step count and batch size on the same torch build; the defaults took 25-26 minutes
on this project's 2-core machines (~0.30 s a step), but one such machine ran 0.50 s a step on
another day (42 minutes): pass fewer `--steps` where a step is slower.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen2vl.evals.runner import teacher_forced  # noqa: E402
from qwen2vl.evals.shapes import COLORS, SHAPES, TASKS, Shape, left_to_right, make_sample, make_samples  # noqa: E402
from qwen2vl.loader import original_layout_name  # noqa: E402
from qwen2vl.layers.rotary import rotate_half  # noqa: E402
from qwen2vl.processor import Processor  # noqa: E402
from qwen2vl.tools.random_checkpoint import write_support_files  # noqa: E402

VOCAB_SIZE = 151936
# Small images keep both training and the demo fast: at most 8 x 8 visual tokens per image.
# (At the task's own resolution, up to 12 x 12, a step costs 1.4x and the same 30 minutes
# trained a worse model: docs/benchmarks.md.)
DEMO_MIN_PIXELS, DEMO_MAX_PIXELS = 56 * 56, 224 * 224
# How often each prompt type is drawn: the one-word tasks are learnt within ~1000 steps, boxes
# and left-to-right descriptions need every sample they can get.
TASK_WEIGHTS = {"shape": 0.5, "color": 0.5, "count": 2, "describe": 3, "ground": 5, "compare": 1, "direction": 0.5}
# Curriculum: the first batches hold only one-word answers, which the model can only get right by
# looking at the image (mixed in from the start, the box digits' loss drowns that signal and the
# model settles on answering without looking).
WARMUP_TASKS = ("shape", "color", "count", "compare", "direction")
CURRICULUM_FRACTION = 0.1
EMBEDDING_INIT_STD = 0.5
# rope_theta: with 8 rotary frequencies per head, M-RoPE gives the width axis the three lowest;
# at the cards' theta (1e6) those turn by < 0.01 rad across a whole image, so the decoder could
# not tell left from right. Theta 20 gives the width axis 0.07-0.15 rad per token.
DEMO_ARCH = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, mrope_section=[2, 3, 3], rope_theta=20.0,
                 vision_embed_dim=96, vision_depth=3, vision_num_heads=4, vision_mlp_ratio=2)
MICRO_ARCH = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, mrope_section=[2, 3, 3], rope_theta=20.0,
                  vision_embed_dim=32, vision_depth=1, vision_num_heads=2, vision_mlp_ratio=2)


def hub_config(arch: dict) -> dict:
    """config.json in the original flat layout of the Qwen2-VL cards."""
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": arch["hidden_size"],
        "image_token_id": 151655,
        "initializer_range": 0.02,
        "intermediate_size": arch["intermediate_size"],
        "max_position_embeddings": 4096,
        "max_window_layers": arch["num_hidden_layers"],
        "num_attention_heads": arch["num_attention_heads"],
        "num_hidden_layers": arch["num_hidden_layers"],
        "num_key_value_heads": arch["num_key_value_heads"],
        "rms_norm_eps": 1e-6,
        "rope_scaling": {"mrope_section": arch["mrope_section"], "type": "mrope"},
        "rope_theta": arch["rope_theta"],
        "sliding_window": 4096,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "video_token_id": 151656,
        "vision_config": {"depth": arch["vision_depth"], "embed_dim": arch["vision_embed_dim"],
                          "hidden_size": arch["hidden_size"], "mlp_ratio": arch["vision_mlp_ratio"],
                          "num_heads": arch["vision_num_heads"], "in_chans": 3, "model_type": "qwen2_vl",
                          "spatial_patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        "vision_end_token_id": 151653,
        "vision_start_token_id": 151652,
        "vision_token_id": 151654,
        "vocab_size": VOCAB_SIZE,
    }


def build_model(arch: dict, seed: int, task_vocab: torch.Tensor):
    """A float32 transformers Qwen2-VL of `arch`, initialized from `seed`, whose token table
    holds `task_vocab` only (`TaskEmbedding`) and whose patch projection is one matmul
    (`PatchProjection`)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(vocab_size=VOCAB_SIZE, hidden_size=arch["hidden_size"], intermediate_size=arch["intermediate_size"],
                num_hidden_layers=arch["num_hidden_layers"], num_attention_heads=arch["num_attention_heads"],
                num_key_value_heads=arch["num_key_value_heads"], rms_norm_eps=1e-6, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": arch["rope_theta"], "mrope_section": arch["mrope_section"]},
                tie_word_embeddings=True)
    vision = dict(depth=arch["vision_depth"], embed_dim=arch["vision_embed_dim"], hidden_size=arch["hidden_size"],
                  num_heads=arch["vision_num_heads"], mlp_ratio=arch["vision_mlp_ratio"], patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).float()
    # `answer_loss` computes the logits from the task table; the full head would only sit in memory.
    model.lm_head = None
    model.set_input_embeddings(TaskEmbedding(task_vocab, arch["hidden_size"]))
    patch_embed = model.model.visual.patch_embed
    patch_embed.proj = PatchProjection(patch_embed.proj.weight)
    return model


class TaskEmbedding(torch.nn.Module):
    """The tied token table, trained on `task_vocab` (the only tokens prompts and answers use)
    alone: every other token embeds to zero, as in the saved checkpoint, so its logit is 0 at
    inference. Training the full 151936-row table cost a quarter of each step (its dense
    gradient and AdamW update) for rows that are zeroed anyway."""

    def __init__(self, task_vocab: torch.Tensor, hidden_size: int):
        super().__init__()
        # transformers' std 0.02 leaves token embeddings ~100x smaller than the vision tower's
        # outputs after a few hundred steps: the prompt's words drown in the residual stream and
        # the model never learns to read the question.
        self.weight = torch.nn.Parameter(torch.randn(len(task_vocab), hidden_size) * EMBEDDING_INIT_STD)
        self.register_buffer("task_vocab", task_vocab, persistent=False)
        rows = torch.full((VOCAB_SIZE,), len(task_vocab), dtype=torch.long)  # the last row: zero
        rows[task_vocab] = torch.arange(len(task_vocab))
        self.register_buffer("rows", rows, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.rows[ids], F.pad(self.weight, (0, 0, 0, 1)))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the task tokens, then one column standing for all the others: each of them
        has logit 0, so together they weigh log(their count) in the softmax."""
        others = math.log(VOCAB_SIZE - len(self.task_vocab))
        return F.pad(hidden @ self.weight.T, (0, 1), value=others)

    def label(self, ids: torch.Tensor) -> torch.Tensor:
        """Column of each id in `logits`."""
        labels = self.rows[ids]
        if (labels == len(self.task_vocab)).any():
            missing = ids[labels == len(self.task_vocab)].unique().tolist()
            raise ValueError(f"answer tokens {missing} are not in the task vocabulary")
        return labels

    def full_table(self) -> torch.Tensor:
        return torch.zeros(VOCAB_SIZE, self.weight.shape[1]).index_copy(0, self.task_vocab, self.weight.detach())


class PatchProjection(torch.nn.Module):
    """The vision tower's Conv3d patch embedding as the matmul it is (kernel = stride = one
    patch): the same weight, a third of the time on the CPU."""

    def __init__(self, weight: torch.nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return F.linear(patches.flatten(1), self.weight.flatten(1))


COLOR_IDS = {color: i + 1 for i, color in enumerate(COLORS)}  # 0: background
SHAPE_IDS = {kind: i + 1 for i, kind in enumerate(SHAPES)}
SHAPE_READOUT = [len(COLOR_IDS) + 1, len(SHAPE_IDS) + 1, 4]  # colour logits, shape logits, box
PLACES = 5  # background, then a shape's place left to right (1 to 4)
TARGET_COLUMNS = 14  # of `token_targets`
IMAGE_TOKEN_ID = 151655
AUX_WEIGHT = 0.5
# The first head of the first decoder layer above the middle is taught where to look
# (`attention_loss`): its inputs are the ones the middle-layer read-out makes carry positions.
ATTENTION_WEIGHT = 1.0
POSITION_UNIT = 0.1  # normalized positions are regressed in tenths of the image


def token_targets(item, shapes: list[Shape], merge_size: int = 2) -> torch.Tensor:
    """What each visual token of an image covers, for the auxiliary losses: `[tokens, 14]` rows
    of (colour id, shape id, the covering shape's box x1, y1, x2, y2 relative to the token's cell
    in cells, the token's centre x, y, the box x1, y1, x2, y2 normalized to the image's width
    and height, the covering shape's index in `shapes`, and its place left to right from 1); the
    shape with the largest overlap wins, ids 0, index -1 and place 0 where the cell is background.

    Read off the vision tower's outputs, the ids and cell-relative edges teach it to see shapes
    in a few hundred steps (through the answer tokens alone, whose attention spreads over ~60
    mostly white tokens, it takes thousands). Read off the decoder's hidden states (halfway up)
    at the image tokens, the normalized positions teach the decoder where each token sits in the
    image, which boxes and left-to-right order need and which M-RoPE only gives relative to
    other tokens. The place is read off both: the vision tower sees the whole image at once (the
    decoder's image tokens only see those before them), and with it a description's k-th shape
    is the one whose tokens say "place k" (named twice or skipped otherwise).
    """
    _, grid_h, grid_w = item.grid_thw
    (width, height), (resized_w, resized_h) = item.original_size, item.resized_size
    cell = resized_w / grid_w * merge_size
    top = torch.arange(grid_h // merge_size, dtype=torch.float32)[:, None] * cell
    left = torch.arange(grid_w // merge_size, dtype=torch.float32)[None, :] * cell
    best = torch.zeros(top.shape[0], left.shape[1])
    centres = torch.stack(torch.broadcast_tensors((left + cell / 2) / resized_w, (top + cell / 2) / resized_h), -1)
    targets = torch.cat([torch.zeros(*best.shape, 6), centres, torch.zeros(*best.shape, 4),
                         torch.full((*best.shape, 1), -1.0), torch.zeros(*best.shape, 1)], -1)
    places = {shapes.index(shape): place for place, shape in enumerate(left_to_right(shapes), 1)}
    for index, shape in enumerate(shapes):
        x1, y1, x2, y2 = shape.box
        x1, x2 = x1 * resized_w / width, x2 * resized_w / width
        y1, y2 = y1 * resized_h / height, y2 * resized_h / height
        overlap = ((torch.minimum(left + cell, torch.tensor(x2)) - torch.maximum(left, torch.tensor(x1))).clamp(min=0)
                   * (torch.minimum(top + cell, torch.tensor(y2)) - torch.maximum(top, torch.tensor(y1))).clamp(min=0))
        wins = overlap > best
        best = torch.where(wins, overlap, best)
        edges = torch.stack(torch.broadcast_tensors((x1 - left) / cell, (y1 - top) / cell, (x2 - left) / cell, (y2 - top) / cell), -1)
        ids = torch.tensor([COLOR_IDS[shape.color], SHAPE_IDS[shape.kind]], dtype=torch.float32).expand(*best.shape, 2)
        box = torch.tensor([x1 / resized_w, y1 / resized_h, x2 / resized_w, y2 / resized_h]).expand(*best.shape, 4)
        tags = torch.tensor([float(index), float(places[index])]).expand(*best.shape, 2)
        row = torch.cat([ids, edges, centres, box, tags], -1)
        targets[wins] = row[wins]
    return targets.flatten(0, 1)


class AuxHeads(torch.nn.Module):
    """Linear read-outs for the auxiliary losses, thrown away after training: colour and shape
    logits, cell-relative box edges and place logits from the vision tower's outputs;
    normalized centre, box and place logits from the decoder's hidden states halfway up, at the
    image tokens."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.vision = torch.nn.Linear(hidden_size, sum(SHAPE_READOUT) + PLACES)
        self.decoder = torch.nn.Linear(hidden_size, 6 + PLACES)
        self.looked_at = torch.nn.Linear(hidden_size, sum(SHAPE_READOUT))
        self.digit = torch.nn.Linear(hidden_size, 1)

    def answer_loss(self, before_looking: torch.Tensor, after_looking: torch.Tensor, looked_at_shape: torch.Tensor,
                    before_last: torch.Tensor, digit_values: torch.Tensor) -> torch.Tensor:
        """At the answer rows that look at one shape: its colour, kind and box, read off the
        output of the layer taught to look; at a description's rows: the place they name, read
        off that layer's input by the read-out that gives the image tokens' places there (so the
        query and its keys say "place k" alike); at the rows that write a box digit: the value of the
        number at that digit's place (see `digit_targets`), read off the last layer's input.
        The answer's own loss alone never taught the decoder to carry what it looked at on to
        the words and digits."""
        loss = torch.zeros(())
        naming = looked_at_shape[:, 6] >= 0
        if naming.any():
            places = self.decoder(before_looking[naming])[:, -PLACES:]
            loss = loss + F.cross_entropy(places, looked_at_shape[naming, 6].long())
        one_shape = looked_at_shape[:, 0] >= 0
        if one_shape.any():
            colors, kinds, box = self.looked_at(after_looking[one_shape]).split(SHAPE_READOUT, -1)
            shapes = looked_at_shape[one_shape]
            loss = loss + (F.cross_entropy(colors, shapes[:, 0].long()) + F.cross_entropy(kinds, shapes[:, 1].long())
                           + F.smooth_l1_loss(box, shapes[:, 2:6] / POSITION_UNIT))
        if len(before_last):
            loss = loss + F.smooth_l1_loss(self.digit(before_last).squeeze(-1), digit_values)
        return loss

    def loss(self, vision_tokens: torch.Tensor, decoder_tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        colors, kinds, edges, places = self.vision(vision_tokens).split(SHAPE_READOUT + [PLACES], -1)
        loss = F.cross_entropy(colors, targets[:, 0].long()) + F.cross_entropy(kinds, targets[:, 1].long())
        centres, box, decoder_places = self.decoder(decoder_tokens).split([2, 4, PLACES], -1)
        loss = loss + F.smooth_l1_loss(centres, targets[:, 6:8] / POSITION_UNIT)
        loss = loss + F.cross_entropy(places, targets[:, 13].long()) + F.cross_entropy(decoder_places, targets[:, 13].long())
        on_shape = targets[:, 0] > 0
        if on_shape.any():
            loss = loss + F.smooth_l1_loss(edges[on_shape], targets[on_shape, 2:6])
            loss = loss + F.smooth_l1_loss(box[on_shape], targets[on_shape, 8:12] / POSITION_UNIT)
        return loss


def answer_words(processor: Processor, ids: list[int], answer_start: int) -> list[tuple[int, str]]:
    """(position, text) of each answer token, stripped of spaces."""
    return [(position, processor.tokenizer.decode([ids[position]]).strip()) for position in range(answer_start, len(ids))]


def attention_targets(sample, ids: list[int], words: list[tuple[int, str]], answer_start: int,
                      targets: list[torch.Tensor]) -> list[tuple[int, list[int], torch.Tensor]]:
    """(row, image token positions, what is there) triples: the answer rows that must look at
    shapes, where those shapes' tokens are, and the shape's colour id, shape id and normalized
    box (`token_targets` columns 0, 1, 8-11 of one of its tokens; -1 where the row looks at two
    shapes), then the place the row names (-1 but in descriptions). A box's digits look at the
    shape the question names; a description's colour and shape words at the shape they name
    (left to right; the row must know which place that is, the image tokens know theirs); a
    comparison's yes/no at the shapes of both images. `words` are the answer's `answer_words`,
    `targets` the `token_targets` of the sample's images."""
    if sample.task not in ("ground", "describe", "compare"):
        return []
    image_positions = [i for i, token in enumerate(ids) if token == IMAGE_TOKEN_ID]
    if sample.task == "compare":
        owners = torch.cat([t[:, 12] for t in targets])
        return [(answer_start - 1, [image_positions[t] for t in (owners >= 0).nonzero().flatten().tolist()], torch.full((7,), -1.0))]
    targets = targets[0]
    if sample.task == "ground":
        target = next(i for i, shape in enumerate(sample.shapes) if f"the {shape.name}<" in sample.answer)
    order = [sample.shapes.index(shape) for shape in left_to_right(sample.shapes)]
    triples, named = [], -1
    for position, word in words:
        if sample.task == "describe":
            named += word in COLORS
            if word not in COLORS and word not in SHAPES:
                continue
            target = order[named]
        elif not word.isdigit():
            continue
        tokens = (targets[:, 12] == target).nonzero().flatten().tolist()
        if tokens:
            place = torch.tensor([named + 1.0 if sample.task == "describe" else -1.0])
            shape = torch.cat([targets[tokens[0], [0, 1, 8, 9, 10, 11]], place])
            triples.append((position - 1, [image_positions[t] for t in tokens], shape))
    return triples


def digit_targets(sample, words: list[tuple[int, str]]) -> list[tuple[int, float]]:
    """(row, value) for each row of a box answer that predicts a digit: the number being written
    in units of that digit's place (465: 4.65 before the 4, 6.5 before the 6, 5 before the 5),
    whose floor is the digit. The box numbers are written one token per digit."""
    if sample.task != "ground":
        return []
    digits = [position for position, word in words if word.isdigit()]
    values = [number / 10 ** place % 10 for number in sample.box for place in reversed(range(len(str(number))))]
    assert len(values) == len(digits), (sample.answer, len(digits))
    return [(position - 1, value) for position, value in zip(digits, values)]


def image_shapes(sample) -> list[list[Shape]]:
    """The shapes drawn in each image of a sample (a video has none listed)."""
    if sample.task == "compare":
        return [[shape] for shape in sample.shapes]
    return [] if sample.task == "direction" else [sample.shapes]


def encode(processor: Processor, sample) -> dict:
    """Prompt + answer ids, their M-RoPE positions, the vision items of one sample and the
    auxiliary targets of its images' tokens."""
    forced = teacher_forced(processor, sample)
    images = [item for item in forced.prompt.vision_items if item.kind == "image"]
    targets = [token_targets(item, shapes) for item, shapes in zip(images, image_shapes(sample))]
    words = answer_words(processor, forced.ids, forced.answer_start)
    return {"ids": forced.ids, "positions": forced.positions,
            "answer_start": forced.answer_start, "items": forced.prompt.vision_items,
            "token_targets": targets,
            "attention_targets": attention_targets(sample, forced.ids, words, forced.answer_start, targets),
            "digit_targets": digit_targets(sample, words)}


@dataclass
class Batch:
    """transformers inputs (right padded), the rows that predict answer tokens, those tokens and
    their weights, and the auxiliary targets of every image token (`[0, 14]` without images)."""

    inputs: dict
    rows: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    token_targets: torch.Tensor
    share: float  # this batch's fraction of its step's samples
    looking_rows: torch.Tensor  # flat rows whose attention is supervised (`attention_targets`)
    looked_at: torch.Tensor  # `[rows, length]` bool: the image tokens each of them should look at
    looked_at_shape: torch.Tensor  # `[rows, 7]`: colour id, shape id, normalized box of that shape, place named
    digit_rows: torch.Tensor  # flat rows that predict a box digit (`digit_targets`)
    digit_values: torch.Tensor  # `[rows]`: the value of the number being written at the digit's place


def collate(examples: list[dict], batch_size: int | None = None) -> Batch:
    """One padded batch of a step of `batch_size` samples (default: this batch alone). A sample's
    answer tokens each weigh 1 / sqrt(its answer length): a 24-token box answer weighs about
    3.5 one-word answers (not 12: the one-word tasks are learnt first and would starve the box
    digits; not 1: then each digit would get a 24th of a word's gradient)."""
    length = max(len(e["ids"]) for e in examples)
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    mask = torch.zeros(len(examples), length, dtype=torch.long)
    positions = torch.zeros(3, len(examples), length, dtype=torch.long)
    rows, targets, weights = [], [], []
    for b, e in enumerate(examples):
        n = len(e["ids"])
        ids[b, :n] = torch.tensor(e["ids"])
        mask[b, :n] = 1
        positions[:, b, :n] = e["positions"]
        rows += [b * length + i for i in range(e["answer_start"] - 1, n - 1)]
        targets += e["ids"][e["answer_start"]:]
        weights += [(n - e["answer_start"]) ** -0.5] * (n - e["answer_start"])
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    for kind, pixels_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                       ("video", "pixel_values_videos", "video_grid_thw")):
        items = [item for e in examples for item in e["items"] if item.kind == kind]
        if items:
            inputs[pixels_key] = torch.cat([item.pixel_values for item in items])
            inputs[grid_key] = torch.tensor([item.grid_thw for item in items])
    token_targets = torch.cat([torch.zeros(0, TARGET_COLUMNS)] + [t for e in examples for t in e["token_targets"]])
    share = len(examples) / (batch_size or len(examples))
    looks = [(b * length + row, keys, shape) for b, e in enumerate(examples) for row, keys, shape in e["attention_targets"]]
    looked_at = torch.zeros(len(looks), length, dtype=torch.bool)
    for index, (_, keys, _) in enumerate(looks):
        looked_at[index, keys] = True
    digits = [(b * length + row, value) for b, e in enumerate(examples) for row, value in e["digit_targets"]]
    return Batch(inputs, torch.tensor(rows), torch.tensor(targets),
                 torch.tensor(weights) * share / len(examples), token_targets, share,
                 torch.tensor([row for row, _, _ in looks], dtype=torch.long), looked_at,
                 torch.stack([shape for _, _, shape in looks]) if looks else torch.zeros(0, 7),
                 torch.tensor([row for row, _ in digits], dtype=torch.long),
                 torch.tensor([value for _, value in digits], dtype=torch.float32))


def micro_batches(examples: list[dict]) -> list[Batch]:
    """A step's examples as two padded batches, with and without video: a 290-token video
    sample would otherwise pad every image sample of the step to its length."""
    groups = [[e for e in examples if has_video(e)], [e for e in examples if not has_video(e)]]
    return [collate(group, len(examples)) for group in groups if group]


def has_video(example: dict) -> bool:
    return any(item.kind == "video" for item in example["items"])


class Hooked:
    """A forward hook (`self.handle`) removed when the `with` block ends."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class AttentionInputs(Hooked):
    """Captures what one decoder layer's attention is given (hidden states, rotary cos/sin)."""

    def __init__(self, attention: torch.nn.Module):
        self.hidden = self.cos_sin = None
        self.handle = attention.register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module, args, kwargs):
        self.hidden, self.cos_sin = kwargs["hidden_states"], kwargs["position_embeddings"]


def attention_loss(attention: torch.nn.Module, inputs: AttentionInputs, rows: torch.Tensor,
                   looked_at: torch.Tensor) -> torch.Tensor:
    """Mean over `rows` of -log(the attention mass head 0 of `attention` puts on `looked_at`).

    Supervising where the box digits look teaches the decoder to pick the named shape among
    several: through the digits' loss alone it stays at chance (it answers with some shape's
    box). Descriptions and comparisons look through the same head, so that it serves all three.
    """
    length, head_dim = inputs.hidden.shape[1], attention.head_dim
    batch_index, position = rows // length, rows % length
    cos, sin = inputs.cos_sin
    query = F.linear(inputs.hidden[batch_index, position], attention.q_proj.weight[:head_dim], attention.q_proj.bias[:head_dim])
    keys = F.linear(inputs.hidden[batch_index], attention.k_proj.weight[:head_dim], attention.k_proj.bias[:head_dim])
    query = query * cos[batch_index, position] + rotate_half(query) * sin[batch_index, position]
    keys = keys * cos[batch_index] + rotate_half(keys) * sin[batch_index]
    logits = (keys @ query[:, :, None]).squeeze(-1) * head_dim ** -0.5
    logits = logits.masked_fill(torch.arange(length)[None, :] > position[:, None], float("-inf"))
    log_probs = logits.log_softmax(-1)
    return -log_probs.masked_fill(~looked_at, float("-inf")).logsumexp(-1).mean()


class ImageTokens(Hooked):
    """Captures the vision tower's image outputs during a forward (images and videos are
    encoded in separate calls; the image call is the one given `image_grid_thw`)."""

    def __init__(self, model, image_grid_thw: torch.Tensor | None):
        self.grid, self.outputs = image_grid_thw, None
        self.handle = model.model.visual.register_forward_hook(self._keep, with_kwargs=True)

    def _keep(self, module, args, kwargs, output):
        if self.grid is not None and torch.equal(kwargs["grid_thw"], self.grid):
            self.outputs = getattr(output, "pooler_output", output)


def answer_loss(model, batch: Batch, aux_heads: AuxHeads | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross entropy of the answer tokens only (logits computed for those rows alone, over the
    whole vocabulary as `TaskEmbedding.logits` counts it), weighted as `collate` says; and, with
    `aux_heads`, the auxiliary loss on the image tokens (else 0)."""
    layers = model.model.language_model.layers
    looking = len(layers) // 2  # hidden_states[looking] is its input, [looking + 1] its output
    attention = layers[looking].self_attn
    with ImageTokens(model, batch.inputs.get("image_grid_thw")) as image_tokens, AttentionInputs(attention) as attention_inputs:
        outputs = model.model(**batch.inputs, use_cache=False, output_hidden_states=aux_heads is not None)
    embedding = model.get_input_embeddings()
    answer_rows = outputs.last_hidden_state.flatten(0, 1)[batch.rows]
    losses = F.cross_entropy(embedding.logits(answer_rows), embedding.label(batch.targets), reduction="none")
    aux = torch.zeros(())
    if aux_heads is not None and image_tokens.outputs is not None:
        # Halfway up the decoder, so that the later layers can read the positions off these tokens.
        middle = outputs.hidden_states[looking].flatten(0, 1)
        decoder_tokens = middle[batch.inputs["input_ids"].flatten() == IMAGE_TOKEN_ID]
        aux = batch.share * aux_heads.loss(image_tokens.outputs, decoder_tokens, batch.token_targets)
        if len(batch.looking_rows):
            aux = aux + batch.share * ATTENTION_WEIGHT * attention_loss(attention, attention_inputs, batch.looking_rows, batch.looked_at)
            before_looking = middle[batch.looking_rows]
            after_looking = outputs.hidden_states[looking + 1].flatten(0, 1)[batch.looking_rows]
            before_last = outputs.hidden_states[-2].flatten(0, 1)[batch.digit_rows]
            aux = aux + batch.share * aux_heads.answer_loss(before_looking, after_looking, batch.looked_at_shape,
                                                            before_last, batch.digit_values)
    return (losses * batch.weights).sum(), aux


def task_vocabulary(processor: Processor, seed: int, n: int = 200) -> torch.Tensor:
    """Every token of the prompts and answers of `n` samples per task: the rows `TaskEmbedding`
    trains (82 tokens; 2000 samples per task find no other)."""
    ids = set()
    for sample in make_samples(n, seed, TASKS):
        ids.update(processor.tokenizer.encode(processor.template.render(sample.messages, True, False)))
        ids.update(processor.tokenizer.encode(sample.answer))
    ids.add(processor.tokenizer.token_to_id("<|im_end|>"))
    return torch.tensor(sorted(ids))


def draw_tasks(rng: random.Random, count: int, tasks: tuple[str, ...] = TASKS) -> list[str]:
    return rng.choices(tasks, weights=[TASK_WEIGHTS[task] for task in tasks], k=count)


class Batches(torch.utils.data.IterableDataset):
    """Fresh encoded steps (lists of `micro_batches`) from a seeded generator (run in one worker
    process, so the sequence is the same whatever the timing)."""

    def __init__(self, support_dir: str | Path, batch_size: int, seed: int, warmup_batches: int = 0):
        self.support_dir, self.batch_size, self.seed = support_dir, batch_size, seed
        self.warmup_batches = warmup_batches

    def __iter__(self):
        torch.set_num_threads(1)
        processor = demo_processor(self.support_dir)
        rng = random.Random(self.seed)
        for index in itertools.count():
            tasks = WARMUP_TASKS if index < self.warmup_batches else TASKS
            batch = [encode(processor, make_sample(task, rng)) for task in draw_tasks(rng, self.batch_size, tasks)]
            yield micro_batches(batch)


def train(model, steps_data, steps: int, seed: int, lr: float, log=print, log_every: int = 50, checkpoint=None,
          checkpoint_every: int = 0, aux: bool = True) -> list[float]:
    """AdamW with warmup and cosine decay on `steps_data` (an iterable of lists of `Batch`, the
    micro-batches of one step); returns the answer loss of every step. With `aux`, the auxiliary
    losses through `AuxHeads`,
    thrown away after training. `checkpoint(model)` runs every `checkpoint_every` steps
    (a usable model if time runs out)."""
    torch.manual_seed(seed)
    aux_heads = AuxHeads(model.config.text_config.hidden_size) if aux else None
    parameters = list(model.parameters()) + (list(aux_heads.parameters()) if aux else [])
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, min(200, steps // 10))
    schedule = lambda step: min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses, aux_losses, start = [], [], time.perf_counter()
    for step, batches in zip(range(steps), steps_data):
        optimizer.zero_grad(set_to_none=True)
        loss = aux_loss = 0.0
        for batch in batches:
            answer, aux = answer_loss(model, batch, aux_heads)
            (answer + AUX_WEIGHT * aux).backward()
            loss, aux_loss = loss + answer.item(), aux_loss + aux.item()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss)
        aux_losses.append(aux_loss)
        if log and (step + 1) % log_every == 0:
            recent, recent_aux = losses[-log_every:], aux_losses[-log_every:]
            log(f"step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} aux {sum(recent_aux) / len(recent):.3f} "
                f"lr {scheduler.get_last_lr()[0]:.2e} {time.perf_counter() - start:.0f} s")
        if checkpoint and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            checkpoint(model)
    model.eval()
    return losses


def batch_loader(support_dir: str | Path, batch_size: int, seed: int, warmup_batches: int = 0):
    """Batches made in a worker process, overlapping the training step."""
    return torch.utils.data.DataLoader(Batches(support_dir, batch_size, seed, warmup_batches), batch_size=None,
                                       num_workers=1, prefetch_factor=4)


def save_checkpoint(model, arch: dict, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """An HF-layout directory: config, bf16 safetensors (the whole token table, zero outside the
    task vocabulary; tied head not stored), tokenizer, and a preprocessor config whose pixel
    limits are the ones the model was trained with."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    write_support_files(out_dir)
    # tokenizer.json holds the whole tokenizer; the slow-tokenizer files only add 4.6 MB to the repo.
    for redundant in ("vocab.json", "merges.txt"):
        (out_dir / redundant).unlink(missing_ok=True)
    state = model.state_dict()
    state["model.language_model.embed_tokens.weight"] = model.get_input_embeddings().full_table()
    tensors = {original_layout_name(name): tensor.detach().to(dtype).contiguous() for name, tensor in state.items()}
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hub_config(arch), indent=2) + "\n")
    preprocessor = json.loads((out_dir / "preprocessor_config.json").read_text())
    preprocessor.update(min_pixels=DEMO_MIN_PIXELS, max_pixels=DEMO_MAX_PIXELS)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    # Greedy, no repetition penalty: box answers repeat digits.
    generation = {"bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643],
                  "do_sample": False, "temperature": 0.0, "repetition_penalty": 1.0, "max_new_tokens": 64}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out_dir


def demo_processor(support_dir: str | Path) -> Processor:
    return Processor.from_pretrained(support_dir, min_pixels=DEMO_MIN_PIXELS, max_pixels=DEMO_MAX_PIXELS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models/qwen2-vl-shapes-demo")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--checkpoint-every", type=int, default=400, help="save the model every N steps")
    parser.add_argument("--micro", action="store_true", help="the micro architecture of the tests")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    arch = MICRO_ARCH if args.micro else DEMO_ARCH
    out = Path(args.out)
    write_support_files(out)
    start = time.perf_counter()
    vocab = task_vocabulary(demo_processor(out), args.seed + 1)
    model = build_model(arch, args.seed, vocab)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M trained parameters ({len(vocab)} token rows); "
          f"tasks {', '.join(TASKS)}", flush=True)
    batches = batch_loader(out, args.batch_size, args.seed, int(CURRICULUM_FRACTION * args.steps))
    train(model, batches, args.steps, args.seed, args.lr, log=lambda line: print(line, flush=True),
          log_every=args.log_every, checkpoint=lambda m: save_checkpoint(m, arch, out),
          checkpoint_every=args.checkpoint_every)
    save_checkpoint(model, arch, out)
    size = (out / "model.safetensors").stat().st_size / 1e6
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s; wrote {out} ({size:.1f} MB)", flush=True)


if __name__ == "__main__":
    main()
