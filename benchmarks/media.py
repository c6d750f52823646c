"""Messages to model inputs, ours against the model card's pipeline, same run: images, a batch, a long video.

    python benchmarks/media.py [--cache-dir .cache/bench] [--repeats 5] [--base REV] [--cases ...]
                               [--doc docs/benchmarks.md]

Each case runs its two sides in two subprocesses started together (so each one's peak RSS is its
own), alternating one repetition of each, and keeps each side's best of `--repeats` (the machine
is shared: the minimum is the least disturbed run):

- `image-448`, `image-1008`, `image-1920x1080`, `image-3840x2160`: one JPEG (smooth content with
  noise, quality 90) in a one-turn chat. Ours is `Processor.prepare` (uint8 pixels: the normalize
  and patchify run where the vision tower runs); the table also gives ours with that patchify done
  on the CPU in float32 (`VisionItem.pixel_values`), what a CPU engine adds to it. The reference is
  `qwen_vl_utils.process_vision_info` + transformers' `Qwen2VLProcessor` (float32 `pixel_values`).
- `batch-32`: 32 one-image conversations of mixed sizes (448x448, 1008x1008, 1920x1080,
  640x480), ours through the media pool (`Processor(conversations)`'s path) against ours one by
  one in one thread (`QWEN2VL_MEDIA_THREADS=1`: the pool's speed-up) and one by one with the
  default pool (each large image's resize still split over it); and, for the machine's own
  ceiling, two one-thread processes preparing the batch at the same time (time per batch: the
  slower one's over two).
- `video-20min`: a 20-minute 640x360 30 fps H.264 file (written into the cache dir with PyAV when
  absent) with its default budget. qwen_vl_utils' video readers do not run here (torchvision 0.29
  has no `read_video`, decord and torchcodec are not installed), so the other side is today's path:
  the `--base` revision's processor (checked out into `.cache/media-REV`), its per-item token
  limit lifted so that it prepares the video at all.

Prints the table and writes it as the "Media preprocessing" section of `--doc`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Media preprocessing: ours vs the model card's pipeline"
LONG_VIDEO = dict(minutes=20, fps=30, width=640, height=360)
IMAGE_SIZES = {"image-448": (448, 448), "image-1008": (1008, 1008), "image-1920x1080": (1920, 1080),
               "image-3840x2160": (3840, 2160)}
BATCH_SIZES = [(448, 448), (1008, 1008), (1920, 1080), (640, 480)]
CASES = [*IMAGE_SIZES, "batch-32", "video-20min"]


def write_image(path: Path, width: int, height: int) -> Path:
    import numpy as np
    from PIL import Image

    if not path.is_file():
        rng = np.random.default_rng(width * height)
        yy, xx = np.mgrid[0:height, 0:width]
        base = np.stack([(xx // 3 + yy // 5 + 80 * c) % 256 for c in range(3)], -1)
        pixels = (base + rng.integers(0, 24, base.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
    return path


def write_long_video(path: Path, minutes: int, fps: int, width: int, height: int) -> Path:
    """An H.264 MP4 (libx264 "veryfast": B-frames, a keyframe at least every 250 frames) of a moving
    gradient with a scene change every 10 s, written with PyAV."""
    import av
    import numpy as np

    if path.is_file():
        return path
    tmp = path.with_suffix(".partial.mp4")
    yy, xx = np.mgrid[0:height, 0:width]
    scene_len = 10 * fps
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for scene in range(minutes * 60 // 10):
            base = np.stack([(xx * (1 + scene % 3) + yy + 70 * c + 40 * scene) % 256 for c in range(3)], -1)
            base = base.astype(np.uint8)
            for t in range(scene_len):
                pixels = np.roll(base, 3 * t, axis=1)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    tmp.rename(path)
    return path


def peak_rss_gib() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited across exec from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


def chat(*parts) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe this."}]}]


def case_messages(case: str, cache: Path) -> list[list[dict]]:
    """The conversations of `case` (one, except the batch)."""
    if case in IMAGE_SIZES:
        width, height = IMAGE_SIZES[case]
        return [chat({"type": "image", "image": str(write_image(cache / f"{width}x{height}.jpg", width, height))})]
    if case == "batch-32":
        sizes = [BATCH_SIZES[i % len(BATCH_SIZES)] for i in range(32)]
        return [chat({"type": "image", "image": str(write_image(cache / f"{w}x{h}.jpg", w, h))}) for w, h in sizes]
    video = cache / "long-{minutes}min-{width}x{height}.mp4".format(**LONG_VIDEO)
    return [chat({"type": "video", "video": str(write_long_video(video, **LONG_VIDEO))})]


# -- workers: one side of one case, one repetition per "run" line on stdin ----------------------------

def side_runner(side: str, case: str, conversations, checkpoint: Path):
    """A function running one repetition; it returns the visual tokens made."""
    if side == "reference":
        from processor_reference import install_pyav_read_video, reference_inputs, reference_processor

        install_pyav_read_video()
        processor = reference_processor(checkpoint)

        def run():
            _, inputs, _ = reference_inputs(processor, conversations)
            return int(sum(g.prod() for g in inputs["image_grid_thw"]) // 4)
        return run
    from qwen2vl.processor import MediaBudget, Processor

    if side == "base":  # today's path, with room for the long video's tokens
        processor = Processor.from_pretrained(checkpoint, budget=MediaBudget(max_item_tokens=10**6))
    else:
        processor = Processor.from_pretrained(checkpoint)
    tokens = lambda prompts: sum(item.num_tokens(2) for p in prompts for item in p.vision_items)  # noqa: E731
    if side == "ours-cpu-patchify":
        def run():
            prompts = [processor.prepare(c) for c in conversations]
            for item in (item for p in prompts for item in p.vision_items):
                item.pixel_values  # noqa: B018 - the float32 rows a CPU engine's vision tower gets
            return tokens(prompts)
        return run
    if side in ("ours-one-by-one", "ours-one-thread", "base"):
        return lambda: tokens([processor.prepare(c) for c in conversations])
    from qwen2vl.processor.pool import media_map

    return lambda: tokens(media_map(processor.prepare, conversations))


def worker(side: str, case: str, cache: Path) -> None:
    sys.path.insert(0, str(Path.cwd() / "tests"))
    run = side_runner(side, case, case_messages(case, cache), cache / "media-ckpt")
    setup_rss = peak_rss_gib()
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        start = time.perf_counter()
        tokens = run()
        print("TIME", json.dumps({"seconds": time.perf_counter() - start, "tokens": tokens}), flush=True)
    peak = peak_rss_gib()
    print("RESULT", json.dumps({"peak_rss_gib": peak, "setup_rss_gib": setup_rss}), flush=True)


class Side:
    def __init__(self, side: str, case: str, cache: Path, tree: Path):
        env = {**os.environ, "PYTHONPATH": str(tree), **({"QWEN2VL_MEDIA_THREADS": "1"} if side == "ours-one-thread" else {})}
        self.name = side
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", side, case,
                                         "--cache-dir", str(cache)], cwd=tree, env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.times: list[float] = []
        self.tokens = None
        self._expect("READY")

    def _expect(self, tag: str) -> str:
        for line in self.process.stdout:
            if line.startswith(tag):
                return line[len(tag):].strip()
        raise SystemExit(f"{self.name} ended without {tag} (exit {self.process.wait()})")

    def run_once(self) -> None:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        result = json.loads(self._expect("TIME"))
        self.times.append(result["seconds"])
        self.tokens = result["tokens"]

    def finish(self) -> dict:
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        result = json.loads(self._expect("RESULT"))
        self.process.wait()
        return {**result, "best_s": min(self.times), "tokens": self.tokens}


class SidePair:
    """Two one-thread processes preparing the batch at once: what this machine's two cores give
    for two independent streams of this work (no shared GIL, no pool), the ceiling for the pool.
    A repetition's time is the slower one's; the ratio to `ours-one-thread` is the two-process speed-up."""

    def __init__(self, case: str, cache: Path, tree: Path):
        self.name = "two-one-thread-processes"
        self.sides = [Side("ours-one-thread", case, cache, tree) for _ in range(2)]
        self.times: list[float] = []

    def run_once(self) -> None:
        for side in self.sides:
            side.process.stdin.write("run\n")
            side.process.stdin.flush()
        results = [json.loads(side._expect("TIME")) for side in self.sides]
        self.times.append(max(r["seconds"] for r in results) / 2)  # per batch, two batches done
        self.tokens = results[0]["tokens"]

    def finish(self) -> dict:
        for side in self.sides:
            side.times = self.times  # the pair's: each side's own were not kept
        results = [side.finish() for side in self.sides]
        return {"peak_rss_gib": max(r["peak_rss_gib"] for r in results), "best_s": min(self.times), "tokens": self.tokens}


def base_tree(rev: str) -> Path:
    tree = ROOT / ".cache" / f"media-{rev}"
    if not tree.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT, check=True, capture_output=True)
    return tree


def measure(case: str, sides: list[tuple[str, Path]], cache: Path, repeats: int) -> dict[str, dict]:
    """Both sides started together; repetitions alternate, the side going first alternating too."""
    print(f"{case}: {' vs '.join(name for name, _ in sides)} ...", flush=True)
    running = [SidePair(case, cache, tree) if name == "two-one-thread-processes" else Side(name, case, cache, tree)
               for name, tree in sides]
    for repeat in range(repeats):
        for side in running if repeat % 2 == 0 else running[::-1]:
            side.run_once()
    return {side.name: side.finish() for side in running}


def table(results: dict[str, dict[str, dict]]) -> str:
    lines = ["| input | visual tokens | ours (s) | ours + float32 patchify on the CPU (s) | other side | other side (s) "
             "| ours / other side | peak RSS ours / other side (GiB) |", "|---|---|---|---|---|---|---|---|"]
    for case, sides in results.items():
        ours, cpu_patchify = sides["ours"], sides.get("ours-cpu-patchify")
        for other_name in (name for name in sides if name not in ("ours", "ours-cpu-patchify")):
            other = sides[other_name]
            tokens = str(ours["tokens"]) if ours["tokens"] == other["tokens"] else f"{ours['tokens']} / {other['tokens']}"
            patchified = f"{cpu_patchify['best_s']:.4f}" if cpu_patchify else "-"
            lines.append(f"| {case} | {tokens} | {ours['best_s']:.4f} | {patchified} | {other_name} | {other['best_s']:.4f} | "
                         f"{ours['best_s'] / other['best_s']:.2f} | {ours['peak_rss_gib']:.2f} / {other['peak_rss_gib']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "bench"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--video-repeats", type=int, default=3, help="the long video's (today's path takes a minute)")
    parser.add_argument("--base", default="ff8e374", help="today's path for the video (a git revision)")
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cache = Path(args.cache_dir).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    if args.worker:
        return worker(*args.worker, cache)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import cpu

    sys.path.insert(0, str(ROOT / "tests"))
    from processor_reference import write_checkpoint_files

    started = cpu.load_note()
    write_checkpoint_files(cache / "media-ckpt")  # tokenizer, preprocessor config, chat template: no weights
    for case in args.cases:  # inputs written once, before anything is timed
        case_messages(case, cache)
    results = {}
    for case in args.cases:
        if case in IMAGE_SIZES:
            results[case] = measure(case, [("ours", ROOT), ("reference", ROOT), ("ours-cpu-patchify", ROOT)], cache,
                                    args.repeats)
        elif case == "batch-32":
            results[case] = measure(case, [("ours", ROOT), ("ours-one-thread", ROOT), ("ours-one-by-one", ROOT),
                                           ("two-one-thread-processes", ROOT)], cache, args.repeats)
        else:
            results[case] = measure(case, [("ours", ROOT), ("base", base_tree(args.base))], cache, args.video_repeats)
        print(json.dumps(results[case]), flush=True)
    body = "\n".join([
        SECTION, "",
        f"`python benchmarks/media.py --repeats {args.repeats} --video-repeats {args.video_repeats} --base {args.base}`, "
        f"messages -> model inputs, best of {args.repeats} per side ({args.video_repeats} for the video), the sides' "
        "repetitions alternating (two subprocesses per case, started together; "
        "peak RSS is each subprocess's, Python, torch and transformers included). Machine: "
        f"{cpu.machine()}; {started} at the start, {cpu.load_note()} at the end (the machine is shared: a load "
        "much over 2 means other jobs; the ratios are of the same run).", "",
        table(results),
    ])
    print(body)
    cpu.write_section(Path(args.doc), body)


if __name__ == "__main__":
    main()
