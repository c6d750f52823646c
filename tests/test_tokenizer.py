"""Our tokenizer against transformers' Qwen2 tokenizer, and streaming detokenization."""
from __future__ import annotations

import pytest

from processor_reference import real_tokenizer_dir

from qwen2vl.processor import IncrementalDetokenizer, Tokenizer
from qwen2vl.processor.tokenizer import byte_decoder

TEXTS = [
    "<|im_start|>user\nHello, world!<|im_end|>\n<|im_start|>assistant\n",
    "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>What's here? 你好世界 😀🚀 naïve café",
    "  leading spaces\n\n\ttabs and <think>tags</think> and <|endoftext|> mid-text",
]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(real_tokenizer_dir())


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(real_tokenizer_dir()))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tokenizer, reference, text):
    ids = tokenizer.encode(text)
    assert ids == reference(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_are_never_split(tokenizer):
    assert tokenizer.encode("<|image_pad|><|video_pad|><|im_end|>") == [151655, 151656, 151645]
    assert tokenizer.token_to_id("<|vision_start|>") == 151652
    assert tokenizer.id_to_token(151653) == "<|vision_end|>"
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (151645, 151643)
    assert tokenizer.vocab_size == 151669


@pytest.mark.parametrize("text", TEXTS + ["多字节字符：𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and emoji 👩‍👩‍👧‍👦 end"])
@pytest.mark.parametrize("skip", [True, False])
def test_incremental_detokenizer(tokenizer, text, skip):
    ids = tokenizer.encode(text)
    stream = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    deltas = [stream.add(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + stream.flush() == tokenizer.decode(ids, skip) == stream.text


def test_incremental_detokenizer_holds_partial_characters(tokenizer):
    ids = tokenizer.encode("😀")
    assert len(ids) == 1
    # byte-level pieces of a 4-byte character, fed one by one
    pieces = [tokenizer.token_to_id(tokenizer.id_to_token(ids[0])[:k]) for k in (1, 2)]
    if None in pieces:
        pytest.skip("vocabulary lacks the split pieces")
    stream = IncrementalDetokenizer(tokenizer)
    assert stream.add(pieces[0]) == ""
    assert stream.flush() == tokenizer.decode(pieces[:1])


def test_byte_level_alphabet_is_a_bijection():
    decoder = byte_decoder()
    assert len(decoder) == 256 and sorted(decoder.values()) == list(range(256))
    assert decoder["Ġ"] == ord(" ") and decoder["a"] == ord("a")


@pytest.mark.parametrize("text", TEXTS + ["多字节字符 😀🚀"])
def test_token_bytes_join_to_the_text(tokenizer, text):
    ids = tokenizer.encode(text)
    assert b"".join(tokenizer.token_bytes(i) for i in ids).decode("utf-8") == text
    assert tokenizer.token_bytes(tokenizer.encode(" a")[0]) == b" a"
