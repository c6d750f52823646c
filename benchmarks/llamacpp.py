"""CPU side by side: our engine against llama.cpp, same random checkpoint, same cores, one run.

    python benchmarks/llamacpp.py --llamacpp DIR [--cache-dir .cache/bench] [--rounds 5]
                                  [--doc docs/benchmarks.md]

DIR holds llama.cpp and its model files; what is missing there is made once and reused:

- the `llama-cpp-python` 0.3.36 sdist (`pip download`), whose vendored llama.cpp is built with
  cmake (`-DGGML_NATIVE=ON`, Release, no curl; only llama-bench, llama-quantize, llama-mtmd-cli);
- the random BF16 checkpoint (`ensure_checkpoints`) converted by llama.cpp's own
  `convert_hf_to_gguf.py` to a BF16 GGUF and to BF16 and F16 mmproj files, and the text GGUF
  quantized by `llama-quantize` to Q4_0 and Q4_K_M. The converter imports sentencepiece even
  for BPE tokenizers; when the venv lacks it, it is installed into DIR/python, not the venv.

Each round measures llama.cpp Q4_0, Q4_K_M, BF16 and ours (the random AWQ checkpoint,
`dtype="auto"`), in an order rotated by one side per round; each cell is the median over rounds:

- decode tok/s at batch 1: `llama-bench -p 0 -n 64`; ours greedy after a short prompt,
  `64 / (t(65 tokens) - t(1 token))` (as benchmarks/cpu.py);
- prompt tok/s at 512 tokens: `llama-bench -p 512 -n 0`; ours 512 random token ids prefilled,
  one token out, `512 / (t - one decode step)`;
  both rates the best of 3 within a round (llama-bench `-r 3`, its fastest sample);
- one 448x448 image to the first token: `llama-mtmd-cli -n 1` with each mmproj, the prompt eval
  time it reports (image encoding + prefill); ours `image_messages`, one token, caches off, after one untimed image;
- peak RSS of each side's processes (ours: one subprocess per round that keeps its engine loaded
  for the round's measurements). Both sides run on `THREADS` threads.

A measurement that fails is reported in its cell, and the run goes on. Prints the table and
writes it as the section "## CPU: our engine vs llama.cpp" of `--doc`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks, also when imported as a package
from cpu import (MAX_MODEL_LEN, ROOT, ensure_checkpoints, image_messages, load_note, peak_rss_gib,  # noqa: E402
                 run_lines, text_messages, timed, write_image, write_section)
from speed import text_prompt  # noqa: E402

SECTION = "## CPU: our engine vs llama.cpp"
SDIST = "llama-cpp-python==0.3.36"
SDIST_DIR = "llama_cpp_python-0.3.36"  # what the sdist unpacks to
CMAKE_FLAGS = ("-DGGML_NATIVE=ON", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF")
TARGETS = ("llama-bench", "llama-quantize", "llama-mtmd-cli")
SENTENCEPIECE = "sentencepiece>=0.1.98,<0.3.0"  # the converter's requirements pin
THREADS = 2
DECODE_TOKENS = 64
PROMPT_TOKENS = 512
REPEATS = 3
QUANTS = ("Q4_0", "Q4_K_M", "BF16")
MMPROJS = ("BF16", "F16")
SIDES = (*QUANTS, "ours")
LLAMACPP_ROWS = ("decode", "prompt", *(f"image {kind}" for kind in MMPROJS), "rss")
OURS_ROWS = ("decode", "prompt", "image", "rss")  # one image row: ours has no separate mmproj
BASELINE = "Q4_K_M"
IMAGE_QUESTION = image_messages("")[0]["content"][1]["text"]
TIMEOUT_S = 900  # one llama.cpp process or one round of ours; a hung one fails its cell, not the run


# --- llama.cpp: build and model files, made once in DIR ---------------------------------------

def setup_step(command: list, log: Path, env: dict | None = None) -> None:
    """Run one setup step with its output in `log`; a failure stops the run naming the step."""
    print(f"  {' '.join(map(str, command[:4]))} ... (log: {log})", flush=True)
    with open(log, "w") as f:
        done = subprocess.run([str(part) for part in command], stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise SystemExit(f"{' '.join(map(str, command))} failed (exit {done.returncode}); the end of {log}:\n"
                         f"{log.read_text()[-3000:]}")


def ensure_build(root: Path) -> tuple[Path, Path]:
    """(llama.cpp source, its bin folder) in `root`, downloaded and built when the binaries are missing."""
    source, build = root / SDIST_DIR / "vendor" / "llama.cpp", root / "build"
    bin_dir = build / "bin"
    if all((bin_dir / target).is_file() for target in TARGETS):
        return source, bin_dir
    root.mkdir(parents=True, exist_ok=True)
    if not (source / "CMakeLists.txt").is_file():
        print(f"downloading {SDIST} into {root} ...", flush=True)
        setup_step([sys.executable, "-m", "pip", "download", SDIST, "--no-binary", ":all:", "--no-deps",
                    "-d", root], root / "download.log")
        with tarfile.open(root / f"{SDIST_DIR}.tar.gz") as sdist:
            sdist.extractall(root, filter="data")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise SystemExit("cmake is not installed: `pip install cmake` or `apt-get install cmake`, then run again")
    print(f"building llama.cpp in {build} (a while on 2 cores) ...", flush=True)
    setup_step([cmake, "-S", source, "-B", build, *CMAKE_FLAGS], root / "configure.log")
    setup_step([cmake, "--build", build, "-j", THREADS, "--target", *TARGETS], root / "build.log")
    return source, bin_dir


def llamacpp_commit(source: Path) -> str:
    """The vendored tree's commit (the sdist ships its git metadata), or "unknown"."""
    done = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def converter_env(root: Path, source: Path) -> dict:
    """Environment for `convert_hf_to_gguf.py`: the vendored gguf-py, and sentencepiece when the venv lacks it."""
    paths = [source / "gguf-py"]
    if importlib.util.find_spec("sentencepiece") is None:
        deps = root / "python"
        if not (deps / "sentencepiece").is_dir():
            setup_step([sys.executable, "-m", "pip", "install", "--no-deps", "--target", deps, SENTENCEPIECE],
                       root / "sentencepiece.log")
        paths.append(deps)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [*paths, os.environ.get("PYTHONPATH", "")]))}


def ensure_ggufs(root: Path, source: Path, bin_dir: Path, checkpoint: Path) -> dict[str, Path]:
    """{"BF16" | "Q4_0" | "Q4_K_M": text GGUF, "mmproj BF16" | "mmproj F16": mmproj GGUF} of
    `checkpoint`, made when missing (each written under a temporary name, then renamed)."""
    out = root / "gguf" / checkpoint.name
    out.mkdir(parents=True, exist_ok=True)
    files = {**{quant: out / f"text-{quant}.gguf" for quant in QUANTS},
             **{f"mmproj {kind}": out / f"mmproj-{kind}.gguf" for kind in MMPROJS}}
    conversions = [("BF16", []), *((f"mmproj {kind}", ["--mmproj"]) for kind in MMPROJS)]
    for key, extra in conversions:
        if files[key].is_file():
            continue
        print(f"converting {checkpoint.name} to {files[key].name} ...", flush=True)
        partial = files[key].with_suffix(".part.gguf")
        setup_step([sys.executable, source / "convert_hf_to_gguf.py", checkpoint, *extra,
                    "--outtype", key.split()[-1].lower(), "--outfile", partial],
                   out / f"{files[key].stem}.log", env=converter_env(root, source))
        partial.rename(files[key])
    for quant in QUANTS:
        if quant == "BF16" or files[quant].is_file():
            continue
        print(f"quantizing to {files[quant].name} ...", flush=True)
        partial = files[quant].with_suffix(".part.gguf")
        setup_step([bin_dir / "llama-quantize", files["BF16"], partial, quant, THREADS], out / f"{files[quant].stem}.log")
        partial.rename(files[quant])
    return files


# --- llama.cpp: measurements ------------------------------------------------------------------

def last_lines(text: str, count: int = 2) -> str:
    """The last `count` non-empty lines of a process's log: where llama.cpp says what went wrong."""
    return " / ".join([line.strip() for line in text.splitlines() if line.strip()][-count:])


def high_water_kib(pid: int) -> int:
    """The process's peak RSS so far (VmHWM), 0 once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) if found else 0


def run_process(command: list) -> tuple[str, str, float]:
    """(stdout, stderr, peak RSS in GiB) of one process; raises RuntimeError if it fails or hangs.
    The peak is polled from /proc: the rusage of a child counts the RSS of this (larger) Python
    process it was forked from."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen([str(part) for part in command], stdout=out, stderr=err)
        deadline, peak_kib = time.monotonic() + TIMEOUT_S, 0
        while process.poll() is None:
            peak_kib = max(peak_kib, high_water_kib(process.pid))
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise RuntimeError(f"{Path(str(command[0])).name} ran past {TIMEOUT_S} s and was stopped")
            time.sleep(0.02)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if process.returncode:
        raise RuntimeError(f"{Path(str(command[0])).name} exited with {process.returncode}: {last_lines(stderr)}")
    return stdout, stderr, peak_kib / 2**20


def bench_rate(bin_dir: Path, model: Path, prompt: int, generate: int) -> tuple[float, float]:
    """(fastest tokens/s of `REPEATS` llama-bench samples, peak RSS GiB) of one pp or tg test."""
    stdout, _, rss = run_process([bin_dir / "llama-bench", "-m", model, "-t", THREADS, "-p", prompt, "-n", generate,
                                  "-r", REPEATS, "-o", "json"])
    (test,) = json.loads(stdout)
    return max(test["samples_ts"]), rss


def image_first_token(bin_dir: Path, model: Path, mmproj: Path, image: str) -> tuple[dict, float]:
    """({"total", "encode", "prefill"} seconds llama-mtmd-cli reports for one image and its
    question up to the first token, peak RSS GiB). Its "prompt eval time" runs from the prompt's
    first batch to its last, so it holds the image encoding: total = prompt eval, prefill = the rest."""
    # -lv 4: the timings are logged at trace level
    _, stderr, rss = run_process([bin_dir / "llama-mtmd-cli", "-m", model, "--mmproj", mmproj, "--image", image,
                                  "-p", IMAGE_QUESTION, "-n", 1, "-t", THREADS, "--temp", 0, "-c", MAX_MODEL_LEN,
                                  "-lv", 4])
    encode_ms = [float(ms) for ms in re.findall(r"mtmd batch encoding done in (\d+) ms", stderr)]
    prompt = re.search(r"prompt eval time =\s*([\d.]+) ms", stderr)
    if not encode_ms or prompt is None:
        raise RuntimeError(f"llama-mtmd-cli printed no encoding or prompt eval time: {last_lines(stderr)}")
    total, encode = float(prompt.group(1)) / 1000, sum(encode_ms) / 1000
    return {"total": total, "encode": encode, "prefill": total - encode}, rss


def measure_llamacpp(bin_dir: Path, files: dict[str, Path], quant: str, image: str) -> dict:
    """One round of one llama.cpp model: {row: value or an error message}."""
    result, rss = {}, []

    def attempt(row, measurement):
        try:
            value, peak = measurement()
            rss.append(peak)
            if isinstance(value, dict):
                result.update({f"{row} {part}": seconds for part, seconds in value.items() if part != "total"})
                value = value["total"]
            result[row] = value
        except Exception as error:  # noqa: BLE001 -- the cell says what failed; the other rows still run
            result[row] = f"failed: {error}"

    attempt("decode", lambda: bench_rate(bin_dir, files[quant], 0, DECODE_TOKENS))
    attempt("prompt", lambda: bench_rate(bin_dir, files[quant], PROMPT_TOKENS, 0))
    for kind in MMPROJS:
        attempt(f"image {kind}", lambda: image_first_token(bin_dir, files[quant], files[f"mmproj {kind}"], image))
    result["rss"] = max(rss) if rss else "failed: no process ran"
    return result


# --- ours: one subprocess per round ------------------------------------------------------------

def run_ours(model_dir: str, image: str) -> dict:
    """One round of our engine: {row: value or an error message}, the engine loaded once."""
    from qwen2vl import Qwen2VL

    torch.set_num_threads(THREADS)
    llm = Qwen2VL.from_pretrained(model_dir, dtype="auto", max_model_len=MAX_MODEL_LEN, prefix_caching=False,
                                  vision_cache_bytes=0)
    greedy = {"temperature": 0.0, "ignore_eos": True}

    def chat(messages, tokens):
        assert llm.chat(messages, max_tokens=tokens, **greedy).usage.completion_tokens == tokens

    def best(fn) -> float:
        return min(timed(fn) for _ in range(REPEATS))

    chat(text_messages(), 2)  # warm-up
    first = best(lambda: chat(text_messages(), 1))
    step = (best(lambda: chat(text_messages(), DECODE_TOKENS + 1)) - first) / DECODE_TOKENS
    result = {"decode": 1 / step}
    try:
        prompt = text_prompt(PROMPT_TOKENS)
        prefill = lambda: llm.complete([prompt], max_tokens=1, **greedy)  # noqa: E731
        prefill()  # warm-up at this length
        result["prompt"] = PROMPT_TOKENS / (best(prefill) - step)
    except Exception as error:  # noqa: BLE001 -- the cell says what failed; the other rows still run
        result["prompt"] = f"failed: {error!r}"
    try:
        # untimed first image: its one-off costs (first shapes through the vision tower) are not the
        # steady state; llama.cpp's fresh process has reserved its encoder's buffers at load
        chat(image_messages(image), 1)
        result["image"] = timed(lambda: chat(image_messages(image), 1))
    except Exception as error:  # noqa: BLE001
        result["image"] = f"failed: {error!r}"
    return result


def spawn_ours(model_dir: Path, image: str) -> dict:
    command = [sys.executable, __file__, "--worker", "--model-dir", str(model_dir), "--image", image]
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {row: f"failed: no result in {TIMEOUT_S} s" for row in OURS_ROWS}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        print(done.stderr[-3000:], file=sys.stderr)
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        return {row: f"failed: {reason}" for row in OURS_ROWS}
    return json.loads(lines[-1][len("RESULT "):])


def worker(args) -> None:
    torch.manual_seed(0)
    result = run_ours(args.model_dir, args.image)
    result["rss"] = peak_rss_gib()
    print("RESULT " + json.dumps(result))


# --- the table ---------------------------------------------------------------------------------

def rounds_of(samples: list, fmt: str, rounds: int, pick=statistics.median) -> str:
    """A cell: `pick` of the values that ran, formatted; how many rounds failed, or why all did."""
    values = [value for value in samples if not isinstance(value, str)]
    if not values:
        reason = next(value for value in samples if isinstance(value, str))
        return " ".join(reason.replace("|", "/").split())[:240]  # one line: a table cell
    cell = fmt.format(pick(values))
    return cell if len(values) == rounds else f"{cell} ({len(values)} of {rounds} rounds)"


def median_or_none(samples: list) -> float | None:
    values = [value for value in samples if not isinstance(value, str)]
    return statistics.median(values) if values else None


def table(samples: dict[str, dict[str, list]], rounds: int) -> str:
    """Markdown table of `samples[side][row]` (per-round values or error messages)."""
    rows = [("decode tok/s, batch 1 (llama-bench tg64)", "decode", "{:.1f}", False),
            (f"prompt tok/s, {PROMPT_TOKENS} tokens (pp{PROMPT_TOKENS})", "prompt", "{:.1f}", False),
            *((f"one 448x448 image to the first token, {kind} mmproj (s)", f"image {kind}", "{:.2f}", True)
              for kind in MMPROJS)]
    lines = [f"| median of {rounds} round{'s' * (rounds > 1)} | " + " | ".join(f"llama.cpp {quant}" for quant in QUANTS)
             + f" | qwen2vl AWQ | ours / {BASELINE} |", "|---|---|---|---|---|---|"]
    for title, row, fmt, is_time in rows:
        ours = samples["ours"]["image" if is_time else row]
        cells = []
        for quant in QUANTS:
            cell = rounds_of(samples[quant][row], fmt, rounds)
            encode, prefill = (median_or_none(samples[quant].get(f"{row} {part}", [])) for part in ("encode", "prefill"))
            if is_time and encode is not None and prefill is not None:
                cell += f" (encode {encode:.2f} + prefill {prefill:.2f})"
            cells.append(cell)
        theirs, mine = median_or_none(samples[BASELINE][row]), median_or_none(ours)
        ratio = "-" if theirs is None or mine is None else f"**{(theirs / mine if is_time else mine / theirs):.2f}**"
        lines.append(f"| {title} | {' | '.join(cells)} | {rounds_of(ours, fmt, rounds)} | {ratio} |")
    rss = {side: rounds_of(samples[side]["rss"], "{:.2f}", rounds, pick=max) for side in SIDES}
    theirs, mine = (max((v for v in samples[side]["rss"] if not isinstance(v, str)), default=None)
                    for side in (BASELINE, "ours"))
    ratio = "-" if theirs is None or mine is None else f"{mine / theirs:.2f} (memory)"
    lines.append(f"| peak RSS GiB, the side's largest process | {' | '.join(rss[q] for q in QUANTS)} | "
                 f"{rss['ours']} | {ratio} |")
    return "\n".join(lines)


# --- the driver --------------------------------------------------------------------------------

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llamacpp", metavar="DIR", help="llama.cpp's build and GGUF files (made there when absent)")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "bench"), help="the random checkpoints")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each side once per round; cells are medians")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    if not args.llamacpp:
        parser.error("--llamacpp DIR is required")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: expected at least 1")

    root, cache_dir = Path(args.llamacpp).resolve(), Path(args.cache_dir)
    awq, bf16 = ensure_checkpoints(cache_dir)
    source, bin_dir = ensure_build(root)
    commit = llamacpp_commit(source)
    files = ensure_ggufs(root, source, bin_dir, bf16)
    image = write_image(cache_dir / "image-448.png")

    started, note = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), load_note()
    samples = {side: {} for side in SIDES}
    for r in range(args.rounds):
        for side in SIDES[r % len(SIDES):] + SIDES[:r % len(SIDES)]:
            print(f"round {r + 1}/{args.rounds}: {side} ...", flush=True)
            start = time.perf_counter()
            try:
                result = spawn_ours(awq, image) if side == "ours" else measure_llamacpp(bin_dir, files, side, image)
            except Exception as error:  # noqa: BLE001 -- a broken side fails its cells, the others still run
                traceback.print_exc()
                result = {row: f"failed: {error!r}" for row in (OURS_ROWS if side == "ours" else LLAMACPP_ROWS)}
            print(f"  {time.perf_counter() - start:.0f} s: {result}", flush=True)
            for row, value in result.items():
                samples[side].setdefault(row, []).append(value)

    command = (f"python benchmarks/llamacpp.py --llamacpp {args.llamacpp} --cache-dir {args.cache_dir} "
               f"--rounds {args.rounds}")
    body = "\n".join([
        SECTION, "", *run_lines(command, started, note),
        f"llama.cpp: commit {commit}, as vendored by the `{SDIST.replace('==', ' ')}` sdist, built with cmake "
        f"`{' '.join(CMAKE_FLAGS)}`; {THREADS} threads on both sides.", "",
        table(samples, args.rounds), "",
        f"Rounds alternate the sides (round r starts one side later). Both sides run the same random-weight "
        f"checkpoint: ours the AWQ one (`dtype=\"auto\"`: the int4 kernel), llama.cpp its BF16 sibling converted "
        f"with its own `convert_hf_to_gguf.py` and quantized with `llama-quantize`. Decode: `llama-bench -p 0 "
        f"-n {DECODE_TOKENS}`; ours greedy after a short chat prompt, `{DECODE_TOKENS} / (t({DECODE_TOKENS + 1} "
        f"tokens) - t(1 token))`. Prompt: `llama-bench -p {PROMPT_TOKENS} -n 0`; ours {PROMPT_TOKENS} random token "
        f"ids, one token out, prefix caching off, `{PROMPT_TOKENS} / (t - one decode step)`. Each rate is the "
        f"best of {REPEATS} within a round (llama-bench `-r {REPEATS}`, its fastest sample). Image: "
        f"`llama-mtmd-cli -n 1 -c {MAX_MODEL_LEN}`, the prompt eval time it reports (the prompt's first batch to its last, the image's encoding included; its image file decoding and resizing not); ours the same "
        f"question through `chat` with one token out, processing included, caches off, after one untimed image. "
        f"Peak RSS: the largest process of the side (llama.cpp's is the image run with its mmproj; ours one "
        f"process per round, `max_model_len={MAX_MODEL_LEN}`). Ratio column: ours' speed over {BASELINE}'s "
        f"(above 1: ours faster); for RSS ours' memory over theirs."])
    print(body)
    write_section(Path(args.doc), body)


if __name__ == "__main__":
    main()
