"""The committed demo model (models/qwen2-vl-shapes-demo) answers the shapes task."""
from pathlib import Path

import pytest

from qwen2vl import Qwen2VL
from qwen2vl.evals.runner import evaluate
from qwen2vl.evals.shapes import make_samples

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "qwen2-vl-shapes-demo"

pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason="demo model not trained yet")


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


def test_describes_the_bundled_example_image(llm):
    messages = [{"role": "user", "content": [{"type": "image", "image": str(ROOT / "examples" / "shapes.png")},
                                             {"type": "text", "text": "Describe this image."}]}]
    assert llm.chat(messages, temperature=0.0, max_tokens=24).text == "a red circle and a blue square"
