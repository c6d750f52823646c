"""The committed demo model (models/qwen2-vl-shapes-demo) answers the shapes task."""
from pathlib import Path

import pytest

from qwen2vl import Qwen2VL
from qwen2vl.cli import main
from qwen2vl.evals.runner import evaluate
from qwen2vl.evals.shapes import make_samples

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "qwen2-vl-shapes-demo"

WITHOUT_BOXES = ("shape", "color", "count", "describe", "compare", "direction")


@pytest.fixture(scope="module")
def llm():
    return Qwen2VL.from_pretrained(MODEL, device="cpu")


def test_checkpoint_fits_the_size_budget():
    assert (MODEL / "model.safetensors").stat().st_size <= 25 * 1024**2


def test_answers_18_of_20_fixed_samples(llm):
    samples = make_samples(3, seed=777)[:20]  # every prompt type, interleaved
    scores = evaluate(llm, samples)
    correct = sum(score.correct for score in scores.values())
    failures = [f for score in scores.values() for f in score.failures]
    assert correct >= 18, failures


def test_answers_the_prompts_without_boxes(llm):
    """A regression guard for the engine end to end (preprocessing, vision tower, M-RoPE, decoder,
    sampling): the demo model's measured accuracy on these prompt types is 96.0-100% except
    describe (85.8%, docs/benchmarks.md)."""
    samples = make_samples(4, seed=777, tasks=WITHOUT_BOXES)
    scores = evaluate(llm, samples)
    failures = [f for score in scores.values() for f in score.failures]
    assert sum(score.correct for score in scores.values()) >= 22, failures
    assert all(scores[task].correct == scores[task].total for task in ("shape", "color", "direction")), failures


def test_describes_the_bundled_example_image(llm):
    messages = [{"role": "user", "content": [{"type": "image", "image": str(ROOT / "examples" / "shapes.png")},
                                             {"type": "text", "text": "Describe this image."}]}]
    assert llm.chat(messages, temperature=0.0, max_tokens=24).text == "a red circle and a blue square"


def test_chat_without_a_model_runs_the_demo_model(monkeypatch, tmp_path, capsys):
    """What `make demo` runs: no --model, nothing in the Hugging Face cache."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    image = str(ROOT / "examples" / "shapes.png")
    assert main(["chat", "--image", image, "--max-tokens", "24", "--timing", "Describe this image."]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "a red circle and a blue square"
    assert "qwen2-vl-shapes-demo" in err  # the timing line names the model it loaded
