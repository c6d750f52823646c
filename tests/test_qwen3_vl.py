"""Qwen3-VL against transformers' `Qwen3VLForConditionalGeneration` (dense) and
`Qwen3VLMoeForConditionalGeneration` (MoE: 8 experts, top 2, sparse and dense layers) on tiny
random checkpoints (q/k norm, head_dim != hidden / heads, interleaved M-RoPE, learned position
grids larger and smaller than the images' patch grids, DeepStack from two blocks): logits, greedy
tokens and top-5 logprobs, through the model and through the engine (batches, the prefix cache,
chunked prefills that split an image, the vision cache), images and videos (a frame list, an mp4
file, image + video: the card's timestamps), fp32, AWQ (dequantized exactly as AutoAWQ packs it)
and block FP8 (e4m3 x block scale); MoE experts in both stacked layouts; the processor's images
against the card's pipeline (qwen_vl_utils, then `Qwen3VLProcessor` with `do_resize=False`).

Model-level inputs come from our Processor (its image parity is tested here too); both models
get our M-RoPE positions, which are checked against the reference's `get_rope_index`. The engine
tests compare with `generate`, which computes its own positions.
"""
from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open

from checkpoints import (
    VARIANTS_3,
    VARIANTS_3_MOE,
    build_reference_model_3,
    reference_config_3,
    write_published_expert_layout,
    write_tiny_checkpoint_3,
)
from test_engine import GREEDY, NEW_TOKENS, hf_generate, make_engine, picture, run, user
from test_model_parity import IMAGE_TOKEN, run_ours
from test_quant import reference_dequantized
from test_qwen2_5_vl import assert_same_predictions, ours_inputs

from qwen2vl.config import Qwen2VLConfig
from qwen2vl.errors import CheckpointError
from qwen2vl.layers.rotary import MRotaryEmbedding, mrope_band_axes
from qwen2vl.loader import checkpoint_name, load_model
from qwen2vl.model.qwen3_vl import WEIGHT_RENAMES, Qwen3VLForConditionalGeneration, position_interpolation
from qwen2vl.processor import Processor
from qwen2vl.sampling_params import SamplingParams
from qwen2vl.tools.random_checkpoint import write_random_checkpoint


def _img(width, height, seed):
    return {"type": "image", "image": picture(width, height, seed)}


# qwen_vl_utils' sizes (multiples of 32): 224x160 (35 tokens), 96x128 (12) and 288x192 (54,
# a patch grid wider than variant "a"'s 16 x 16 learned positions), 96x96 (9) and 64x128 (8).
CONVERSATIONS = {
    "text": [user("Write a haiku about the sea, please.")],
    "image": [user(_img(224, 160, 1), "What is this?")],
    "two_images": [user(_img(100, 140, 2), "and", _img(300, 200, 3), "Compare them.")],
    "multi_turn": [user(_img(84, 84, 7), "Describe it."),
                   {"role": "assistant", "content": "A square of noise."},
                   user(_img(64, 130, 8), "And this one?")],
}
REFERENCE_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
                  "video_grid_thw", "mm_token_type_ids")


@torch.no_grad()
def reference_logits(reference, inputs):
    given = {k: inputs[k] for k in REFERENCE_KEYS if k in inputs}
    return reference(**given, position_ids=inputs["position_ids"]).logits[0]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """variant -> (our model, transformers' model, our processor, checkpoint), each built once."""
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    built = {}

    def get(variant):
        if variant not in built:
            ckpt = write_tiny_checkpoint_3(tmp_path_factory.mktemp(f"tiny-3-{variant}"), variant)
            reference_class = Qwen3VLMoeForConditionalGeneration if variant in VARIANTS_3_MOE \
                else Qwen3VLForConditionalGeneration
            reference = reference_class.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
            built[variant] = load_model(ckpt), reference, Processor.from_pretrained(ckpt), ckpt
        return built[variant]
    return get


@pytest.fixture(scope="module", params=[*VARIANTS_3, *VARIANTS_3_MOE])
def setup(request, build):
    """Each dense variant and the MoE one: the parity matrix (text, images, multi-turn, videos,
    batches, the prefix cache, chunked prefills)."""
    return build(request.param)


@pytest.fixture(scope="module", params=list(VARIANTS_3))
def dense_setup(request, build):
    """The dense variants only, for what the MoE variant shares with them (the tower, positions,
    the processor)."""
    return build(request.param)


@pytest.fixture(scope="module", params=["a", *VARIANTS_3_MOE])
def dense_and_moe_setup(request, build):
    """One dense variant and the MoE one, for what the other dense variant would only repeat."""
    return build(request.param)


@pytest.fixture(scope="module")
def moe_setup(build):
    return build("moe")


# --- the model ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_predictions_match_transformers(setup, name):
    model, reference, processor, _ = setup
    assert isinstance(model, Qwen3VLForConditionalGeneration)
    (ours,) = run_ours(model, [ours_inputs(processor, CONVERSATIONS[name])])
    assert_same_predictions(ours, reference_logits(reference, processor(CONVERSATIONS[name])))
    assert len(set(ours.argmax(-1).tolist())) > 3  # far from uniform: a wrong position or feature shows


@pytest.mark.parametrize("name", ["image", "two_images", "multi_turn"])
def test_image_positions_equal_the_reference_rope_index(dense_setup, name):
    model, reference, processor, _ = dense_setup
    inputs = processor(CONVERSATIONS[name])
    positions, delta = reference.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                      inputs["image_grid_thw"], None, inputs["attention_mask"])
    assert torch.equal(inputs["position_ids"], positions)
    assert inputs["rope_deltas"].flatten().tolist() == delta.flatten().tolist()


def test_mixed_batch_matches_each_prompt_alone(setup):
    model, reference, processor, _ = setup
    names = ("two_images", "text", "image", "multi_turn")
    prompts = [ours_inputs(processor, CONVERSATIONS[name]) for name in names]
    for ours, prompt, name in zip(run_ours(model, prompts), prompts, names):
        (alone,) = run_ours(model, [prompt])
        torch.testing.assert_close(ours, alone, rtol=1e-5, atol=1e-5)
        assert_same_predictions(ours, reference_logits(reference, processor(CONVERSATIONS[name])))


def test_encode_vision_matches_the_reference_tower(dense_setup):
    """Each row: the merger's embedding, then one DeepStack feature per `deepstack_visual_indexes`."""
    model, reference, processor, _ = dense_setup
    inputs = processor(CONVERSATIONS["two_images"])
    with torch.no_grad():
        ours = model.encode_vision(inputs["pixel_values"], inputs["image_grid_thw"])
        theirs = reference.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    hidden = model.config.text.hidden_size
    deepstack = theirs.deepstack_features
    assert ours.shape == (len(torch.cat(theirs.pooler_output)), hidden * (1 + len(deepstack))) and len(deepstack) == 2
    torch.testing.assert_close(ours, torch.cat([torch.cat(theirs.pooler_output), *deepstack], dim=-1),
                               rtol=1e-5, atol=1e-5)


def test_deepstack_features_are_not_dropped(dense_setup):
    """Zeroing the DeepStack features changes the logits at and after the image; with the
    reference's DeepStack mergers zeroed likewise, both agree again."""
    model, reference, processor, _ = dense_setup
    prompt = ours_inputs(processor, CONVERSATIONS["image"])
    (full,) = run_ours(model, [prompt])
    hidden = model.config.text.hidden_size
    encode = model.encode_vision
    model.encode_vision = lambda pixels, grids: torch.cat(
        [encode(pixels, grids)[:, :hidden], torch.zeros_like(encode(pixels, grids)[:, hidden:])], dim=-1)
    try:
        (without,) = run_ours(model, [prompt])
    finally:
        del model.encode_vision
    first_pad = prompt[0].tolist().index(IMAGE_TOKEN)
    assert torch.equal(full[:first_pad], without[:first_pad])
    assert (full - without)[first_pad:].abs().max() > 0.05 * full.abs().max()
    assert not torch.equal(full.argmax(-1), without.argmax(-1))
    zeroed = build_reference_model_3(_variant(model))
    with torch.no_grad():
        for merger in zeroed.model.visual.deepstack_merger_list:
            merger.linear_fc2.weight.zero_()
            merger.linear_fc2.bias.zero_()
    assert_same_predictions(without, reference_logits(zeroed, processor(CONVERSATIONS["image"])))


def _variant(model) -> str:
    return next(name for name, spec in VARIANTS_3.items()
                if spec["text"]["hidden_size"] == model.config.text.hidden_size)


# --- the engine -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def generated(setup):
    """transformers `generate`: greedy ids and the log-softmax of the first 8 steps, by conversation."""
    _, reference, processor, _ = setup
    return reference_generations(reference, {name: processor.prepare(m) for name, m in CONVERSATIONS.items()})


def reference_generations(reference, prompts: dict) -> dict:
    """transformers `generate` on each named prompt: (greedy ids, log-softmax of the first 8 steps)."""
    results = {}
    for name, prompt in prompts.items():
        out = hf_generate(reference, prompt, repetition_penalty=1.0, output_logits=True)
        results[name] = (out.sequences[0, len(prompt):].tolist(),
                         [step[0].float().log_softmax(-1) for step in out.logits[:8]])
    return results


TOP5 = SamplingParams.from_overrides(GREEDY, logprobs=5)


def assert_engine_matches(outputs, names, generated):
    for name, output in zip(names, outputs):
        ids, logprobs = generated[name]
        assert len(ids) == NEW_TOKENS and output.token_ids == ids, name
        for step, theirs in enumerate(logprobs):
            top, top_ids = theirs.topk(5)
            assert set(top_ids.tolist()) <= set(output.logprobs[step]), (name, step)
            for token_id, logprob in zip(top_ids.tolist(), top.tolist()):
                assert abs(output.logprobs[step][token_id] - logprob) < 1e-4, (name, step)


def test_engine_batch_equals_generate_and_outputs_vary(setup, generated):
    model, _, processor, _ = setup
    names = list(CONVERSATIONS)
    outputs = run(make_engine(model, processor), [processor.prepare(CONVERSATIONS[n]) for n in names], TOP5)
    assert_engine_matches(outputs, names, generated)
    if not model.config.text.tie_word_embeddings:
        # A tiny tied model repeats the prompt's last token: its own std-1 embedding dominates the
        # residual stream, and the tied head scores it highest. The untied one shows any error.
        assert len({tuple(o.token_ids) for o in outputs}) == len(names)
        assert all(len(set(o.token_ids)) > 8 for o in outputs)


def test_prefix_cached_second_run_and_vision_cache(setup, generated, monkeypatch):
    """The second run of the same prompts takes their full blocks from the prefix cache and their
    images (embeddings and DeepStack features) from the vision cache: encoded once, same outputs."""
    model, _, processor, _ = setup
    names = ["image", "two_images", "multi_turn"]
    prompts = [processor.prepare(CONVERSATIONS[n]) for n in names]
    engine = make_engine(model, processor)
    encoded = []
    encode = engine.runner.encode_vision
    monkeypatch.setattr(engine.runner, "encode_vision", lambda works: encoded.append(len(works)) or encode(works))
    first = run(engine, prompts, TOP5)
    second = run(engine, prompts, TOP5)
    assert [o.num_cached_tokens for o in first] == [0, 0, 0]
    assert all(o.num_cached_tokens >= len(p) - 16 for o, p in zip(second, prompts))
    assert_engine_matches(first, names, generated)
    assert_engine_matches(second, names, generated)
    # without the prefix cache, the second run's prompts are computed again from cached encodings
    engine = make_engine(model, processor, prefix_caching=False)
    monkeypatch.setattr(engine.runner, "encode_vision", lambda works: encoded.append(len(works)) or encode(works))
    encoded.clear()
    run(engine, prompts[:1])
    outputs = run(engine, prompts[:1], TOP5)
    assert len(encoded) == 1 and engine.vision_cache.num_hits == 1
    assert_engine_matches(outputs, names[:1], generated)


def image_pad_runs(ids: list[int]) -> list[int]:
    """The lengths of the runs of image pads in `ids`: one per image."""
    runs, previous = [], None
    for token in ids:
        if token == IMAGE_TOKEN:
            runs[-1:] = [runs[-1] + 1] if previous == IMAGE_TOKEN else [*runs[-1:], 1]
        previous = token
    return runs


def test_chunked_prefill_splitting_an_image(setup, generated):
    """Chunks of 7 tokens: every image's rows (and their DeepStack features) arrive over several
    steps; then a prefix cached up to the middle of an image (the first request aborted after one
    chunk, the vision cache off, so the second needs the embeddings from the middle)."""
    model, _, processor, _ = setup
    names = ["image", "two_images"]
    prompts = [processor.prepare(CONVERSATIONS[n]) for n in names]
    runs = [image_pad_runs(p.input_ids) for p in prompts]
    assert runs == [[35], [12, 54]]  # each longer than a chunk: split across several
    outputs = run(make_engine(model, processor, max_num_batched_tokens=7, vision_cache_bytes=0), prompts, TOP5)
    assert_engine_matches(outputs, names, generated)

    prompt = prompts[0]
    pads = [i for i, t in enumerate(prompt.input_ids) if t == IMAGE_TOKEN]
    # the first chunk ends 4 tokens into the image (6 pads): its last full block of 4 ends inside it
    assert len(pads) > 4
    engine = make_engine(model, processor, block_size=4, max_num_batched_tokens=pads[0] + 4, vision_cache_bytes=0)
    doomed = engine.add_request(prompt, GREEDY)
    engine.step()
    engine.abort(doomed)
    [output] = run(engine, [prompt], TOP5)
    assert pads[0] < output.num_cached_tokens < pads[-1]
    assert_engine_matches([output], names[:1], generated)
    assert engine.num_free_blocks == engine.num_total_blocks


def test_python_api_chat(setup, generated):
    from qwen2vl import Qwen2VL

    _, _, _, ckpt = setup
    llm = Qwen2VL.from_pretrained(ckpt, device="cpu")
    completion = llm.chat(CONVERSATIONS["image"], max_new_tokens=NEW_TOKENS, temperature=0, repetition_penalty=1.0,
                          ignore_eos=True)
    assert completion.token_ids == generated["image"][0]


# --- videos ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def video_conversations(tmp_path_factory):
    """A frame list, an mp4 file (20 frames at 8 fps, sampled at 2 fps: 4 frames), and an image
    with a video in one prompt; frames kept to 4-12 tokens of 32 x 32 (qwen_vl_utils' per-item
    bounds) so that the prompts stay short."""
    from processor_reference import install_pyav_read_video, write_mp4

    install_pyav_read_video()  # qwen_vl_utils' reader for the reference pipeline's video file
    clip = write_mp4(tmp_path_factory.mktemp("clip") / "clip.mp4", [picture(112, 84, s) for s in range(20)], fps=8)
    small = {"min_pixels": 32 * 32 * 4, "max_pixels": 32 * 32 * 12}
    return {
        "video_frames": [user({"type": "video", "video": [picture(96, 64, s) for s in range(4)], **small},
                              "What happens?")],
        "video_file": [user({"type": "video", "video": f"file://{clip}", "fps": 2.0, **small}, "Describe the clip.")],
        "image_and_video": [user(_img(84, 56, 5), "then",
                                 {"type": "video", "video": [picture(64, 64, s) for s in range(10, 16)], **small},
                                 "Compare them.")],
    }


@pytest.mark.parametrize("name", ["video_frames", "video_file", "image_and_video"])
def test_video_prompt_timestamps_and_positions_equal_the_reference(dense_setup, video_conversations, name):
    """Against the card's pipeline on the same frames and metadata: pixels, grids and ids (Qwen's
    prompt: the timestamps `_calculate_timestamps` gives, one `<t seconds>` group per temporal
    patch), and positions equal to the model's get_rope_index on our ids."""
    from test_qwen3_vl_processor import assert_parity, card_inputs
    from transformers import AutoProcessor

    model, reference, processor, ckpt = dense_setup
    hf_processor = AutoProcessor.from_pretrained(ckpt)
    conversation = video_conversations[name]
    got, expected = assert_parity(processor, hf_processor, [conversation])
    _, _, metadata = card_inputs(hf_processor, [conversation])
    stamps = [s for m in metadata for s in hf_processor._calculate_timestamps(m["frames_indices"], m["fps"], 2)]
    prompt = processor.prepare(conversation)
    ours = re.findall(r"<(\d+\.\d) seconds>", prompt.text)
    assert ours == [f"{s:.1f}" for s in stamps] and len(ours) == int(got["video_grid_thw"][:, 0].sum())
    theirs = re.findall(r"<(\d+\.\d) seconds>", hf_processor.tokenizer.decode(expected["input_ids"][0]))
    assert ours == theirs
    positions, delta = reference.model.get_rope_index(got["input_ids"], got["mm_token_type_ids"],
                                                      got.get("image_grid_thw"), got["video_grid_thw"].clone(),
                                                      got["attention_mask"])
    assert torch.equal(got["position_ids"], positions)
    assert got["rope_deltas"].flatten().tolist() == delta.flatten().tolist()


@pytest.mark.parametrize("name", ["video_frames", "video_file", "image_and_video"])
def test_video_predictions_match_transformers(dense_and_moe_setup, video_conversations, name):
    model, reference, processor, _ = dense_and_moe_setup
    conversation = video_conversations[name]
    (ours,) = run_ours(model, [ours_inputs(processor, conversation)])
    assert_same_predictions(ours, reference_logits(reference, processor(conversation)))
    assert len(set(ours.argmax(-1).tolist())) > 3


def test_engine_videos_equal_generate(dense_and_moe_setup, video_conversations):
    """The three video prompts in one engine batch: greedy tokens and top-5 logprobs of `generate`
    on the same ids and pixels (its own positions, from get_rope_index)."""
    model, reference, processor, _ = dense_and_moe_setup
    names = list(video_conversations)
    prompts = [processor.prepare(video_conversations[n]) for n in names]
    generated = reference_generations(reference, dict(zip(names, prompts)))
    outputs = run(make_engine(model, processor), prompts, TOP5)
    assert_engine_matches(outputs, names, generated)
    if not model.config.text.tie_word_embeddings:  # see test_engine_batch_equals_generate_and_outputs_vary
        assert len({tuple(o.token_ids) for o in outputs}) == len(names)


# --- MoE: the published expert layout ----------------------------------------------------------

def test_published_expert_layout_loads_and_matches(moe_setup, tmp_path):
    """Qwen's MoE checkpoints store `gate_up_proj [E, H, 2I]` and `down_proj [E, I, H]`, not the
    `[E, 2I, H]` / `[E, H, I]` that 5.17's `save_pretrained` wrote: the same model from either."""
    model, reference, processor, ckpt = moe_setup
    published = write_published_expert_layout(ckpt, tmp_path / "published")
    with safe_open(published / "model.safetensors", "pt") as f:
        assert f.get_slice("model.language_model.layers.0.mlp.experts.gate_up_proj").get_shape() == [8, 80, 48]
        assert f.get_slice("model.language_model.layers.2.mlp.experts.down_proj").get_shape() == [8, 24, 80]
        assert "model.language_model.layers.1.mlp.gate_proj.weight" in f.keys()  # layer 1 is dense
    loaded = load_model(published)
    theirs = dict(model.named_parameters())
    assert all(torch.equal(p, theirs[name]) for name, p in loaded.named_parameters())
    (ours,) = run_ours(loaded, [ours_inputs(processor, CONVERSATIONS["image"])])
    assert_same_predictions(ours, reference_logits(reference, processor(CONVERSATIONS["image"])))


# --- AWQ ----------------------------------------------------------------------------------------

def stack_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with per-expert `experts.<e>.{gate,up,down}_proj.weight` stacked as transformers 5.17
    holds them: `experts.gate_up_proj [E, 2I, H]` and `experts.down_proj [E, H, I]`."""
    per_expert, out = {}, {}
    for key, value in state.items():
        match = re.fullmatch(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", key)
        if match:
            per_expert.setdefault(match[1], {}).setdefault(int(match[2]), {})[match[3]] = value
        else:
            out[key] = value
    for prefix, experts in per_expert.items():
        ordered = [experts[e] for e in range(len(experts))]
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([e["gate_proj"], e["up_proj"]]) for e in ordered])
        out[f"{prefix}.down_proj"] = torch.stack([e["down_proj"] for e in ordered])
    return out


@pytest.mark.parametrize("variant", ["a", "moe"])
def test_awq_checkpoint_matches_transformers_on_the_dequantized_weights(tmp_path, variant):
    """AWQ: Qwen3-VL's decoder linears; Qwen3-VL-MoE's too, its experts stored one per expert as the
    published AWQ MoE checkpoints store them (dequantized into our stacked experts on load)."""
    config = reference_config_3(variant)
    ckpt = write_random_checkpoint(config.to_dict(), tmp_path, dtype="fp16", quant="awq", group_size=8)
    state = {}
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        assert "model.language_model.layers.0.self_attn.q_norm.weight" in f.keys()  # the published layout
        assert (variant == "moe") == ("model.language_model.layers.0.mlp.experts.7.down_proj.qweight" in f.keys())
        for key in f.keys():
            if key.endswith((".qzeros", ".scales")):
                continue
            if key.endswith(".qweight"):
                prefix = key.removesuffix(".qweight")
                state[f"{prefix}.weight"] = reference_dequantized(f, prefix, "awq", 4, 8)
            else:
                state[key] = f.get_tensor(key).float()
    state = stack_experts(state)
    reference = build_reference_model_3(variant)  # its weights replaced by the dequantized ones below
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    model = load_model(ckpt, dtype=torch.float32)
    assert model.config.quant.method == "awq"
    processor = Processor.from_pretrained(ckpt)
    for name in ("image", "text"):
        (ours,) = run_ours(model, [ours_inputs(processor, CONVERSATIONS[name])])
        assert_same_predictions(ours, reference_logits(reference, processor(CONVERSATIONS[name])))


# --- FP8 ----------------------------------------------------------------------------------------

def test_fp8_checkpoint_matches_transformers_on_the_dequantized_weights(build, tmp_path):
    """Variant "a" re-written as Qwen's block FP8 (e4m3, a float32 scale per 24 x 40 block, partial
    blocks at the edges; the vision tower and lm_head kept), against transformers on the exact
    dequantization: text and image through the model, the image prompt through the engine."""
    from fp8_checkpoints import write_dequantized_checkpoint, write_fp8_checkpoint
    from transformers import Qwen3VLForConditionalGeneration as Reference3

    ckpt = build("a")[3]
    fp8 = write_fp8_checkpoint(ckpt, tmp_path / "fp8", (24, 40))
    with safe_open(fp8 / "model.safetensors", "pt") as f:
        assert f.get_slice("model.language_model.layers.0.self_attn.q_proj.weight").get_dtype() == "F8_E4M3"
        assert f.get_slice("model.language_model.layers.2.mlp.down_proj.weight_scale_inv").get_shape() == [3, 4]
    reference = Reference3.from_pretrained(write_dequantized_checkpoint(fp8, tmp_path / "dequantized"),
                                           dtype=torch.float32, attn_implementation="sdpa").eval()
    model = load_model(fp8, dtype=torch.float32)
    assert model.config.quant.method == "fp8"
    processor = Processor.from_pretrained(fp8)
    for name in ("text", "image"):
        (ours,) = run_ours(model, [ours_inputs(processor, CONVERSATIONS[name])])
        assert_same_predictions(ours, reference_logits(reference, processor(CONVERSATIONS[name])))
    prompt = processor.prepare(CONVERSATIONS["image"])
    generated = reference_generations(reference, {"image": prompt})
    assert_engine_matches(run(make_engine(model, processor), [prompt], TOP5), ["image"], generated)


# --- config, rotary, positions by hand ------------------------------------------------------------

def test_config_reads_the_qwen3_fields():
    config = Qwen2VLConfig.from_dict(reference_config_3("a").to_dict())
    text, vision = config.text, config.vision
    assert config.model_type == "qwen3_vl"
    assert (text.head_dim, text.qk_norm, text.attention_bias, text.mrope_interleaved) == (24, True, False, True)
    assert (text.mrope_section, text.rope_theta) == ((6, 3, 3), 5e6)
    assert (vision.embed_dim, vision.hidden_size, vision.mlp_hidden_size, vision.patch_size) == (32, 64, 48, 16)
    assert (vision.num_position_embeddings, vision.position_grid_side) == (256, 16)
    assert vision.deepstack_visual_indexes == (0, 2)
    assert vision.hidden_act == "gelu_pytorch_tanh" and vision.video_timestamps
    # Qwen2-VL's decoder as before
    from checkpoints import reference_config

    qwen2 = Qwen2VLConfig.from_dict(reference_config("a").to_dict())
    assert (qwen2.text.qk_norm, qwen2.text.attention_bias, qwen2.text.mrope_interleaved) == (False, True, False)
    assert not qwen2.vision.video_timestamps


@pytest.mark.parametrize("change, message", [
    ({"deepstack_visual_indexes": [0, 3]}, r"deepstack_visual_indexes \[3\]"),
    ({"num_position_embeddings": 250}, "not a square"),
    ({"hidden_act": "silu"}, "hidden_act 'silu'"),
])
def test_bad_vision_settings_are_refused_by_name(change, message):
    d = reference_config_3("a").to_dict()
    d["vision_config"].update(change)
    with pytest.raises(CheckpointError, match=message):
        Qwen2VLConfig.from_dict(d)


def test_interleaved_mrope_bands_by_hand():
    """Qwen3-VL's [24, 20, 20]: H on bands 1, 4, ..., 58, W on 2, 5, ..., 59, T on the rest
    (0, 3, ..., 57 and 60..63); the chunked layout as before."""
    axes = mrope_band_axes((24, 20, 20), interleaved=True).tolist()
    assert axes[:7] == [0, 1, 2, 0, 1, 2, 0] and axes[57:] == [0, 1, 2, 0, 0, 0, 0]
    assert [axes.count(a) for a in (0, 1, 2)] == [24, 20, 20]
    assert mrope_band_axes((2, 3, 3), interleaved=False).tolist() == [0, 0, 1, 1, 1, 2, 2, 2]


def test_interleaved_mrope_equals_the_reference_rotary():
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    config = reference_config_3("a").text_config
    positions = torch.randint(0, 500, (3, 40))
    theirs = Qwen3VLTextRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions[:, None])
    ours = MRotaryEmbedding(24, 5e6, (6, 3, 3), interleaved=True).cos_sin(positions, torch.float32)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b[0], rtol=0, atol=1e-6)


def test_position_interpolation_by_hand():
    """A 3 x 3 learned grid sampled at 2 x 5 patches, corners aligned: rows at 0 and 2, columns
    at 0, 0.5, 1, 1.5, 2."""
    indices, weights = position_interpolation(2, 5, side=3)
    grid = torch.arange(9.0)  # the value of a learned position is its index
    sampled = (grid[indices] * weights).sum(0)
    assert sampled.tolist() == [[0, 0.5, 1, 1.5, 2], [6, 6.5, 7, 7.5, 8]]
    assert torch.allclose(weights.sum(0), torch.ones(2, 5))


def test_weight_renames_take_the_index():
    assert checkpoint_name("visual.blocks.11.mlp.fc2.bias", WEIGHT_RENAMES) == "visual.blocks.11.mlp.linear_fc2.bias"
    assert checkpoint_name("visual.deepstack_merger_list.1.ln_q.weight", WEIGHT_RENAMES) == \
        "visual.deepstack_merger_list.1.norm.weight"
    assert checkpoint_name("visual.merger.fc1.weight", WEIGHT_RENAMES) == "visual.merger.linear_fc1.weight"
    assert checkpoint_name("language_model.layers.0.self_attn.q_norm.weight", WEIGHT_RENAMES) == \
        "model.layers.0.self_attn.q_norm.weight"


# --- the processor's images ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["image", "two_images", "multi_turn"])
def test_processor_images_equal_qwen3vlprocessor(dense_setup, name):
    """The card's pipeline, qwen_vl_utils (patch 16) then transformers' Qwen3VLProcessor with the
    checkpoint's preprocessor_config.json and `do_resize=False`: the same ids, pixels and grids.
    (The processor alone would raise small images to its 65536-pixel floor; the card's sizes are
    qwen_vl_utils': test_qwen3_vl_processor.py's test_small_image_follows_qwen_vl_utils.)"""
    from test_qwen3_vl_processor import card_inputs
    from transformers import AutoProcessor

    _, _, processor, ckpt = dense_setup
    reference = AutoProcessor.from_pretrained(ckpt)
    assert type(reference).__name__ == "Qwen3VLProcessor"
    conversation = CONVERSATIONS[name]
    theirs, _, _ = card_inputs(reference, [conversation])
    ours = processor(conversation)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["image_grid_thw"], theirs["image_grid_thw"])
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-5)
    assert all(h % 2 == 0 and w % 2 == 0 for _, h, w in ours["image_grid_thw"].tolist())

