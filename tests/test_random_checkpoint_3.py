"""`qwen2vl.tools.random_checkpoint` on Qwen3-VL: a shrunken copy of the published
Qwen3-VL-2B-Instruct config.json (its layout: `rope_scaling` and `rope_theta` in `text_config`,
tied embeddings, three DeepStack blocks; only depths and widths made small) written in bf16 and
AWQ, with Qwen3-VL's support files, loads and decodes. The bf16 one decodes as transformers'
`Qwen3VLForConditionalGeneration` does on the same weights (float32 compute)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from test_engine import NEW_TOKENS, hf_generate, picture, user
from test_qwen3_vl import assert_engine_matches

from qwen2vl import Qwen2VL
from qwen2vl.config import Qwen2VLConfig
from qwen2vl.processor.chat import ChatTemplate
from qwen2vl.tools.random_checkpoint import write_random_checkpoint

ASSETS = Path(__file__).resolve().parent.parent / "qwen2vl" / "assets"
PUBLISHED_2B = json.loads((ASSETS / "qwen3-vl-2b-instruct.config.json").read_text())


def shrunken_2b() -> dict:
    config = copy.deepcopy(PUBLISHED_2B)
    config["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=32)
    config["text_config"]["rope_scaling"]["mrope_section"] = [6, 5, 5]
    config["vision_config"].update(depth=3, hidden_size=32, intermediate_size=64, num_heads=2,
                                   num_position_embeddings=64, out_hidden_size=64, deepstack_visual_indexes=[0, 1, 2])
    return config


CONVERSATIONS = [
    [user("Write a haiku about the sea, please.")],
    [user({"type": "image", "image": picture(84, 56, 1)}, "What is this?")],
    [user({"type": "image", "image": picture(96, 160, 2)}, "and", {"type": "image", "image": picture(64, 64, 3)},
          "Compare them.")],
]


@pytest.fixture(scope="module", params=["bf16", "awq"])
def written(request, tmp_path_factory):
    quant = None if request.param == "bf16" else "awq"
    out = tmp_path_factory.mktemp(f"random-2b-{request.param}")
    return request.param, write_random_checkpoint(shrunken_2b(), out, quant=quant, group_size=32)


def test_the_published_2b_config_parses_with_its_tied_head():
    config = Qwen2VLConfig.from_dict(PUBLISHED_2B)
    assert config.model_type == "qwen3_vl" and config.text.tie_word_embeddings
    assert (config.text.num_layers, config.vision.depth) == (28, 24)
    assert config.vision.deepstack_visual_indexes == (5, 11, 17)


def test_checkpoint_has_the_published_layout_and_qwen3_vl_files(written):
    kind, ckpt = written
    config = json.loads((ckpt / "config.json").read_text())
    assert config["text_config"] == shrunken_2b()["text_config"] and config["tie_word_embeddings"] is True
    assert config["torch_dtype"] == ("bfloat16" if kind == "bf16" else "float16")
    assert ("quantization_config" in config) == (kind == "awq")
    from safetensors import safe_open

    with safe_open(ckpt / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys  # tied, as the 2B
    # the published layout: transformers' current one, as Qwen3-VL-2B-Instruct's model.safetensors
    assert {"model.language_model.embed_tokens.weight", "model.language_model.layers.2.self_attn.q_norm.weight",
            "model.visual.pos_embed.weight", "model.visual.deepstack_merger_list.2.linear_fc2.weight"} <= keys
    assert not any(key.startswith(("model.layers.", "visual.")) for key in keys)
    assert ("model.language_model.layers.0.mlp.down_proj.qweight" in keys) == (kind == "awq")
    for name, asset in (("preprocessor_config.json", "qwen3-vl.preprocessor_config.json"),
                        ("video_preprocessor_config.json", "qwen3-vl.video_preprocessor_config.json"),
                        ("generation_config.json", "qwen3-vl.generation_config.json")):
        assert json.loads((ckpt / name).read_text()) == json.loads((ASSETS / asset).read_text()), name
    template = (ASSETS / "qwen3-vl.chat_template.jinja").read_text()
    assert json.loads((ckpt / "chat_template.json").read_text())["chat_template"] == template
    assert json.loads((ckpt / "tokenizer_config.json").read_text())["chat_template"] == template
    prompt = ChatTemplate.from_dir(ckpt).render(CONVERSATIONS[0])
    assert prompt == "<|im_start|>user\nWrite a haiku about the sea, please.<|im_end|>\n<|im_start|>assistant\n"


def test_loads_and_decodes(written):
    """A tiny tied model repeats the prompt's last token (tests/test_qwen3_vl.py says why): the
    prompts show in the logprobs, which differ, not in the greedy tokens."""
    kind, ckpt = written
    llm = Qwen2VL.from_pretrained(ckpt, device="cpu", dtype="fp32", max_model_len=1024)
    outputs = [llm.chat(messages, max_tokens=NEW_TOKENS, temperature=0, repetition_penalty=1.0, ignore_eos=True,
                        logprobs=5) for messages in CONVERSATIONS]
    assert all(len(o.token_ids) == NEW_TOKENS for o in outputs)
    assert len({tuple(sorted(o.logprobs[0].items())) for o in outputs}) == len(CONVERSATIONS)
    if kind == "awq":
        return
    from transformers import Qwen3VLForConditionalGeneration

    reference = Qwen3VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32,
                                                                attn_implementation="sdpa").eval()
    generated = {}
    for index, messages in enumerate(CONVERSATIONS):
        out = hf_generate(reference, llm.processor.prepare(messages), repetition_penalty=1.0, output_logits=True)
        generated[index] = (out.sequences[0, -NEW_TOKENS:].tolist(),
                            [step[0].log_softmax(-1) for step in out.logits[:8]])
    assert_engine_matches(outputs, range(len(CONVERSATIONS)), generated)


def test_the_published_2b_tensors_are_those_transformers_loads():
    """Every tensor the writer would write for the real 2B (names in the published layout and
    shapes; nothing written) is a parameter of transformers' model of that config, and the only
    parameter left out is the tied lm_head."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from qwen2vl.tools.random_checkpoint import _tensor_groups, current_layout_name

    ours = {current_layout_name(name): shape for group in _tensor_groups(Qwen2VLConfig.from_dict(PUBLISHED_2B),
                                                                        torch.bfloat16).values()
            for name, (shape, _) in group.specs.items()}
    with torch.device("meta"):
        reference = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**PUBLISHED_2B))
    theirs = {name: tuple(param.shape) for name, param in reference.state_dict().items()}
    assert set(theirs) - set(ours) == {"lm_head.weight"} and reference.config.tie_word_embeddings
    assert {name: theirs[name] for name in ours} == ours
