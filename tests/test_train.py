"""scripts/train_demo.py on a micro architecture: the loss falls and the saved checkpoint is
what our engine runs."""
import importlib.util
import json
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
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(train_demo, tmp_path_factory):
    """A micro model after a few steps on one fixed batch, saved; with its losses."""
    out = tmp_path_factory.mktemp("micro")
    train_demo.write_support_files(out)
    processor = train_demo.demo_processor(out)
    samples = make_samples(1, seed=5)
    batch = train_demo.collate([train_demo.encode(processor, s) for s in samples])
    model = train_demo.build_model(train_demo.MICRO_ARCH, seed=0)
    vocab = train_demo.task_vocabulary(processor, seed=1, n=5)
    losses = train_demo.train(model, [batch] * 8, steps=8, seed=0, lr=2e-2, task_vocab=vocab, log=None)
    train_demo.save_checkpoint(model, train_demo.MICRO_ARCH, out)
    return model, out, losses, samples, processor


def test_a_few_steps_reduce_the_loss(trained):
    _, _, losses, _, _ = trained
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 1.0, losses


def test_sampled_softmax_equals_the_full_one_over_all_candidates(train_demo, trained):
    model, _, _, samples, processor = trained
    inputs, rows, targets, weights = train_demo.collate([train_demo.encode(processor, s) for s in samples[:3]])
    with torch.no_grad():
        full = train_demo.answer_loss(model, inputs, rows, targets, weights)
        every = train_demo.answer_loss(model, inputs, rows, targets, weights, torch.arange(train_demo.VOCAB_SIZE))
    assert full.item() == pytest.approx(every.item(), rel=1e-5)


def test_answer_rows_predict_the_answer_tokens(train_demo, trained):
    *_, samples, processor = trained
    example = train_demo.encode(processor, samples[0])
    _, rows, targets, weights = train_demo.collate([example])
    answer = processor.tokenizer.encode(samples[0].answer) + [processor.tokenizer.token_to_id("<|im_end|>")]
    assert targets.tolist() == answer
    assert weights.sum().item() == pytest.approx(1.0)  # one sample weighs one, however long its answer
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
    model = model.to(torch.bfloat16).float()  # the checkpoint is stored in bf16
    for sample, answer in zip(samples, answers):
        example = train_demo.encode(processor, sample)
        inputs, *_ = train_demo.collate([example])
        with torch.no_grad():
            hidden = model.model(**inputs, use_cache=False).last_hidden_state[0, example["answer_start"] - 1]
            logprobs = torch.log_softmax(hidden @ model.get_input_embeddings().weight.T, dim=-1)
        expected = logprobs.topk(3)
        assert answer.token_ids[0] == expected.indices[0].item()
        for token, value in zip(expected.indices.tolist(), expected.values.tolist()):
            assert answer.logprobs[0][token] == pytest.approx(value, abs=2e-3)
