"""Prefix and vision caching on vs off, same run, same weights: what reuse saves.

    python benchmarks/prefix_cache.py [--rounds 2] [--doc docs/benchmarks.md]

On the random-weight 2B AWQ checkpoint of `benchmarks/cpu.py` (written into `.cache/bench` when
absent), one process loads the model once and runs two engines over it: caches on (the default)
and off (`prefix_caching=False, vision_cache_bytes=0`), alternating their order round by round
and keeping each side's best:

- turn 2 of a chat about one 448x448 image: the time to its first token, after turn 1 (a fresh
  image every round, so nothing but turn 1 is ever cached);
- an agent session of 8 steps, each adding a new 448x448 screenshot and keeping the last 3 in the
  history, 16 new tokens per step: the total time;
- 16 requests sharing a ~1,000-token system prompt and one image, different questions, submitted
  as one batch (`Qwen2VL.chat([...])`): requests per second;
- 8 requests with nothing in common (their own system prompt and image): requests per second,
  hashing included.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Prefix and vision caching: on vs off"
GREEDY = dict(temperature=0.0, repetition_penalty=1.0, ignore_eos=True)


def image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(448, 448, 3, generator=g) * 255).to(torch.uint8).numpy())


def user(text: str, picture: Image.Image | None = None) -> dict:
    content = ([{"type": "image", "image": picture}] if picture is not None else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def turn_two_ttft(llm, seed: int) -> float:
    turn = [user("Describe this screenshot.", image(seed))]
    answer = llm.chat(turn, max_tokens=16, **GREEDY)
    history = turn + [{"role": "assistant", "content": answer.text}, user("Which button should I press next?")]
    start = time.perf_counter()
    llm.chat(history, max_tokens=1, **GREEDY)
    return time.perf_counter() - start


def agent_session(llm, seed: int, steps: int = 8, keep: int = 3) -> float:
    system = {"role": "system", "content": "You operate a phone. Look at each screenshot and say what to tap."}
    history: list[tuple[dict, dict]] = []
    start = time.perf_counter()
    for step in range(steps):
        question = user(f"Step {step + 1}: what do you tap?", image(seed * 100 + step))
        messages = [system] + [m for pair in history[-(keep - 1):] for m in pair] + [question]
        answer = llm.chat(messages, max_tokens=16, **GREEDY)
        history.append((question, {"role": "assistant", "content": answer.text}))
    return time.perf_counter() - start


def shared_prefix_rate(llm, seed: int, n: int = 16) -> float:
    system = {"role": "system", "content": " ".join(f"Rule {i}: answer about the attached form, field by field."
                                                    for i in range(90))}
    form = image(seed)
    batch = [[system, user(f"What is in field {i + 1}?", form)] for i in range(n)]
    start = time.perf_counter()
    llm.chat(batch, max_tokens=8, **GREEDY)
    return n / (time.perf_counter() - start)


def nothing_shared_rate(llm, seed: int, n: int = 8) -> float:
    batch = [[{"role": "system", "content": f"You are assistant number {seed}-{i}."},
              user(f"Describe picture {i}.", image(seed * 1000 + i))] for i in range(n)]
    start = time.perf_counter()
    llm.chat(batch, max_tokens=8, **GREEDY)
    return n / (time.perf_counter() - start)


CASES = [  # (name, function, unit, whether higher is better)
    ("turn 2 of an image chat, time to first token", turn_two_ttft, "s", False),
    ("agent session, 8 steps, last 3 screenshots kept", agent_session, "s", False),
    ("16 requests sharing a ~1,000-token system prompt and an image", shared_prefix_rate, "requests/s", True),
    ("8 requests with nothing in common", nothing_shared_rate, "requests/s", True),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()

    from qwen2vl import Qwen2VL
    from qwen2vl.engine import LLMEngine

    awq, _ = cpu.ensure_checkpoints(ROOT / ".cache" / "bench")
    started, note = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), cpu.load_note()
    on = Qwen2VL.from_pretrained(awq, dtype="auto", max_model_len=4096)
    engine = on.engine
    off = Qwen2VL(LLMEngine(engine.model, on.processor, generation_config=engine.generation_config, max_model_len=4096,
                            prefix_caching=False, vision_cache_bytes=0), on.processor, on.model_dir)
    sides = {"on": on, "off": off}
    best: dict[tuple[str, str], float] = {}
    for round_ in range(args.rounds):
        for name, case, unit, higher in CASES:
            for side in (("off", "on") if round_ % 2 == 0 else ("on", "off")):
                value = case(sides[side], seed=round_ * 10 + (side == "on"))
                print(f"round {round_ + 1} | {name} | cache {side}: {value:.3f} {unit}", flush=True)
                kept = best.get((name, side))
                best[name, side] = value if kept is None else (max if higher else min)(kept, value)
    rows = ["| case | cache off | cache on | on vs off |", "|---|---|---|---|"]
    for name, _, unit, higher in CASES:
        off_value, on_value = best[name, "off"], best[name, "on"]
        gain = on_value / off_value if higher else off_value / on_value
        rows.append(f"| {name} | {off_value:.3f} {unit} | {on_value:.3f} {unit} | {gain:.2f}x |")
    body = "\n".join([
        SECTION, "",
        *cpu.run_lines(f"python benchmarks/prefix_cache.py --rounds {args.rounds}", started, note),
        *rows, "",
        "Random-weight Qwen2-VL-2B-Instruct-AWQ (`dtype=\"auto\"`: the int4 kernel), one model shared by two "
        "engines: caches on (the default) and off (`prefix_caching=False, vision_cache_bytes=0`), each case "
        "alternating the order of the sides, best of the rounds. \"on vs off\": how many times faster (or more "
        "requests per second) with the caches. Greedy, EOS ignored."])
    print(body)
    cpu.write_section(Path(args.doc), body)


if __name__ == "__main__":
    main()
