"""`qwen2vl`: chat with a Qwen2-VL checkpoint, or run a JSONL file of conversations."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from . import __version__
from .errors import InputError, Qwen2VLError
from .jsonl import MAX_LINE_BYTES

EPILOG = """examples:
  qwen2vl chat --model Qwen/Qwen2-VL-2B-Instruct-AWQ --image photo.jpg "Describe this image."
  qwen2vl chat --model DIR                      # interactive; /image PATH adds an image
  qwen2vl chat --model DIR --image shapes.png --draw-boxes out.png "Where is the red circle?"
  qwen2vl generate --model DIR --input convs.jsonl --output answers.jsonl --temperature 0
  qwen2vl serve --model DIR --port 8000          # OpenAI-compatible server on 127.0.0.1
  qwen2vl quantize DIR OUT --method awq --group-size 64   # 4-bit AWQ GEMM checkpoint
  qwen2vl eval DIR --task shapes --n 700         # accuracy per prompt type on 700 fresh samples
"""


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """The `EngineArgs` fields that have a flag, with their defaults and help."""
    from .engine_args import EngineArgs

    group = parser.add_argument_group("model")
    for f in dataclasses.fields(EngineArgs):
        if not f.metadata["flag"]:
            continue
        flag, help_ = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.default is True:
            group.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", help=help_)
        else:
            group.add_argument(flag, type=int if "int" in str(f.type) else None, default=f.default, help=help_)
    group.add_argument("--chat-template", metavar="FILE",
                       help="a Jinja chat template (or JSON with a 'chat_template' key) for every conversation, "
                            "those with tools too (default: the checkpoint's, and a built-in one for tools)")


def _engine_args(args: argparse.Namespace):
    from .engine_args import EngineArgs

    return EngineArgs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineArgs) if f.metadata["flag"]})


def _add_sampling_options(parser: argparse.ArgumentParser,
                          title: str = "sampling (unset = the checkpoint's generation_config.json)",
                          structured: bool = True) -> None:
    """The `SamplingParams` fields that have a flag (the structured-output ones when `structured`)."""
    from .sampling_params import SamplingParams, fields_where
    from .structured import KINDS

    group = parser.add_argument_group(title)
    types = {f.name: str(f.type) for f in dataclasses.fields(SamplingParams)}
    for name in fields_where("flag"):
        flag, help_ = "--" + name.replace("_", "-"), SamplingParams.__dataclass_fields__[name].metadata["flag"] or None
        if name in KINDS and not structured:
            continue
        if name in _STRUCTURED_FLAG_TYPES:
            group.add_argument(flag, type=_STRUCTURED_FLAG_TYPES[name], help=help_)
        elif types[name] == "bool":
            group.add_argument(flag, action="store_true", default=None, help=help_)
        elif "list" in types[name]:
            group.add_argument(flag, action="append", help=help_)
        else:
            group.add_argument(flag, type=float if "float" in types[name] else int, help=help_)


def _json_file(path: str):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"cannot read a JSON schema from {path}: {e}") from None


def _text_file(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {e}") from None


# How the structured-output flags read their values: `--json-schema FILE`, `--grammar FILE`,
# `--choice A,B,C`, `--regex R` as given.
_STRUCTURED_FLAG_TYPES = {"json_schema": _json_file, "grammar": _text_file, "choice": lambda text: text.split(","),
                          "regex": str}


def _sampling_params(args: argparse.Namespace):
    from .sampling_params import SamplingParams, fields_where

    return SamplingParams(**{name: getattr(args, name) for name in fields_where("flag")
                             if getattr(args, name, None) is not None})


def _load(args: argparse.Namespace):
    from .api import Qwen2VL
    from .processor.chat import ChatTemplate
    from .progress import ProgressLine

    template = ChatTemplate.from_file(args.chat_template) if args.chat_template else None  # before the slow load
    line = ProgressLine()
    llm = Qwen2VL.from_pretrained(args=_engine_args(args), progress=line.update)
    line.close()
    if template is not None:
        template.special_tokens = llm.processor.tokenizer.special_tokens
        llm.processor.template = template
        llm.engine.detect_thinking()  # the template says whether prompts open the reasoning
    return llm


def _user_message(prompt: str, images: list, videos: list[str]) -> dict:
    content = [{"type": "image", "image": path} for path in images]
    content += [{"type": "video", "video": path} for path in videos]
    content.append({"type": "text", "text": prompt})
    return {"role": "user", "content": content}


def _answer(llm, messages: list[dict], params, timing: bool):
    """Stream one answer to stdout; returns its `Completion`."""
    start = time.perf_counter()
    first = None
    stream = llm.chat(messages, params, stream=True)
    thought = False
    for reasoning, delta in stream.parts():
        first = first or time.perf_counter()
        if reasoning:  # a thinking model's: on stderr, dimmed on a terminal; stdout is the answer
            dim = sys.stderr.isatty()
            print(f"\x1b[2m{reasoning}\x1b[0m" if dim else reasoning, end="", file=sys.stderr, flush=True)
            thought = True
        if delta and thought:
            print(file=sys.stderr)
            thought = False
        print(delta, end="", flush=True)
    print()
    completion = stream.completion
    if timing:
        end = time.perf_counter()
        tokens = completion.usage.completion_tokens
        decode_rate = (tokens - 1) / (end - first) if first and tokens > 1 and end > first else 0.0
        ttft = (first or end) - start
        print(f"[prompt {completion.usage.prompt_tokens} tokens, time to first text {ttft * 1000:.0f} ms, "
              f"{tokens} tokens in {end - start:.2f} s, decode {decode_rate:.1f} tokens/s, "
              f"finish: {completion.finish_reason}]", file=sys.stderr)
    return completion


def _short(text: str, limit: int = 160) -> str:
    """A path or URL as messages show it: whole, but for the head of a long one (a data: URI)."""
    return text if len(text) <= limit else text[:48] + "..."


def _check_draw_boxes(args: argparse.Namespace) -> None:
    """Everything about --draw-boxes that can be checked before the model is loaded."""
    from PIL import Image

    out = Path(args.draw_boxes)
    if args.prompt is None:
        raise InputError("--draw-boxes draws one answer's boxes: give a PROMPT")
    if not args.image:
        raise InputError("--draw-boxes needs an --image to draw on")
    if out.is_dir():
        raise InputError(f"--draw-boxes {out}: is a directory; give a file name such as {out / 'boxes.png'}")
    if not out.parent.is_dir():
        raise InputError(f"--draw-boxes {out}: folder {out.parent} does not exist")
    formats = Image.registered_extensions()
    if formats.get(out.suffix.lower()) not in Image.SAVE:
        raise InputError(f"--draw-boxes {out}: cannot write images of type {out.suffix or '(none)'!r}; "
                         "use .png or .jpg")


def _open_image(llm, image: str, option: str = "--image"):
    """`image` (a path, file://, data: or http(s) URL) opened as the model will read it, once."""
    from .errors import MediaError
    from .processor.image import open_image

    budget = llm.processor.budget
    try:
        opened = open_image(image, llm.processor.media_policy, budget.max_source_pixels)
        budget.check_source("the image", *opened.size)
        return opened
    except MediaError as error:
        raise MediaError(f"{option} {_short(image)}: {error}") from None


def _draw_boxes(completion, image, out_path: str) -> None:
    from .grounding import Point, draw_boxes

    boxes = completion.boxes()  # on the prompt's last image, the one drawn on
    try:
        draw_boxes(image, boxes).save(out_path)
    except (OSError, ValueError) as error:
        raise InputError(f"--draw-boxes {out_path}: cannot write the image ({error})") from None
    for mark in boxes:
        if isinstance(mark, Point):
            print(f"point {mark.label or ''} ({mark.x:.0f},{mark.y:.0f})", file=sys.stderr)
        else:
            print(f"box {mark.label or ''} ({mark.x1:.0f},{mark.y1:.0f}),({mark.x2:.0f},{mark.y2:.0f})", file=sys.stderr)
    print(f"[{len(boxes)} box(es) drawn to {out_path}]", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> int:
    if args.draw_boxes:
        _check_draw_boxes(args)
    start = time.perf_counter()
    llm = _load(args)
    if args.timing:
        print(f"[loaded {llm.model_dir} in {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    params = _sampling_params(args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    images, videos = list(args.image or []), list(args.video or [])
    if args.prompt is None:
        return chat_loop(llm, history, params, images, videos, args.timing)
    if args.draw_boxes:
        images[-1] = _open_image(llm, images[-1])  # opened once: the model reads it, the boxes go on it
    completion = _answer(llm, history + [_user_message(args.prompt, images, videos)], params, args.timing)
    if args.draw_boxes:
        _draw_boxes(completion, images[-1], args.draw_boxes)
    return 0


CHAT_COMMANDS = (
    ("/image PATH_OR_URL", "attach an image to the next message"),
    ("/video PATH", "attach a video to the next message"),
    ("/reset", "forget the conversation and any attachments (the --system prompt stays)"),
    ("/help", "list these commands"),
    ("/quit", "leave (also /exit or Ctrl-D)"),
)


def _print_help() -> None:
    width = max(len(usage) for usage, _ in CHAT_COMMANDS)
    for usage, meaning in CHAT_COMMANDS:
        print(f"  {usage.ljust(width)}  {meaning}", file=sys.stderr)
    print("  a line starting with // is sent as a message starting with /", file=sys.stderr)


def _attach(llm, kind: str, source: str):
    """The attachment to keep for `/image` or `/video`: an opened image, or a checked video path."""
    if kind == "image":
        return _open_image(llm, source, "/image")
    if "://" not in source and not Path(source).is_file():
        raise InputError(f"/video {source}: no such file")
    return source


def chat_loop(llm, history: list[dict], params, images: list, videos: list, timing: bool, read=None) -> int:
    """The interactive chat: each line `read("> ")` returns (default: `input`) is a message or a /command."""
    read = read or input
    print("Type a message; /image PATH attaches an image to it, /help lists the commands, /quit leaves.",
          file=sys.stderr)
    system = [m for m in history if m["role"] == "system"]
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            return 0
        if not line:
            continue
        command, _, argument = line.partition(" ")
        argument = argument.strip()
        if line.startswith("//"):
            line = line[1:]
        elif command in ("/quit", "/exit"):
            return 0
        elif command == "/help":
            _print_help()
            continue
        elif command == "/reset":
            dropped = len(images) + len(videos)
            history, images, videos = list(system), [], []
            print("conversation cleared" + (f" ({dropped} attachment(s) dropped)" if dropped else ""), file=sys.stderr)
            continue
        elif command in ("/image", "/video"):
            kind = command[1:]
            if not argument:
                print(f"usage: {command} PATH (attaches the {kind} to your next message)", file=sys.stderr)
                continue
            try:
                (images if kind == "image" else videos).append(_attach(llm, kind, argument))
            except Qwen2VLError as error:
                print(f"error: {error}", file=sys.stderr)
                continue
            print(f"{kind} attached: {_short(argument)} (it goes with your next message)", file=sys.stderr)
            continue
        elif line.startswith("/"):
            print(f"unknown command {command}; /help lists the commands (start with // to send it as a message)",
                  file=sys.stderr)
            continue
        message = _user_message(line, images, videos)
        images, videos = [], []
        try:
            text = _answer(llm, history + [message], params, timing).text
        except Qwen2VLError as error:
            print(f"error: {error}", file=sys.stderr)
            continue
        history += [message, {"role": "assistant", "content": text}]


def cmd_generate(args: argparse.Namespace) -> int:
    """Exit status 0: every row answered; 1: some rows are error rows (the summary says how many)."""
    from .batch_job import JobOutput, Progress, answer_rows, id_key, write_rows
    from .progress import note

    if args.output == "-":
        args.output = None  # the rows go to standard output, as without --output
        if args.resume:
            raise InputError("--resume continues an --output file; standard output (--output -) cannot be read back")
    if args.resume and not args.output:
        raise InputError("--resume continues an --output file: give --output")
    if args.max_line_bytes is not None and args.max_line_bytes < 1:
        raise InputError(f"--max-line-bytes {args.max_line_bytes}: expected an integer >= 1", field="max_line_bytes")
    if args.ray:
        if args.max_line_bytes is not None:
            raise InputError("--max-line-bytes: with --ray, Ray Data reads the lines", field="max_line_bytes")
        if args.input == "-":
            raise InputError("--input -: with --ray, the workers read the input, and they cannot read this "
                             "standard input; give a file (or a URI every node can read)", field="input")
        try:
            from .distributed.ray_batch import run_cli_job
        except ModuleNotFoundError as error:
            raise Qwen2VLError(f"--ray needs the ray extra ({error.name} is not installed): "
                               "pip install 'qwen2vl[ray]', or from a clone pip install -e '.[ray]'") from None
        _announce_replicas_model(args.model)
        return run_cli_job(args, _engine_args(args), _sampling_params(args))
    if args.num_replicas is not None or args.ray_address is not None:
        raise InputError("--num-replicas and --ray-address go with --ray")
    max_line_bytes = MAX_LINE_BYTES if args.max_line_bytes is None else args.max_line_bytes
    records = _read_input(args.input, max_line_bytes)
    output = JobOutput(args.output, resume=args.resume, max_line_bytes=max_line_bytes) if args.output else None
    try:
        todo = [record for record in records if output is None or id_key(record["id"]) not in output.done]
        if output is not None and len(todo) < len(records):
            note(f"[--resume: {len(records) - len(todo)} rows already in {args.output}]")
        llm = _load(args) if todo else None
        progress = Progress(len(todo))
        lines = {id_key(record["id"]): record["line"] for record in todo}
        name = "stdin" if args.input == "-" else args.input

        def name_its_line(row: dict) -> None:
            if "error" in row:
                note(f"{name}: line {lines[id_key(row['id'])]}: {row['error']['message']}")

        answered = ([row] for row in answer_rows(llm, todo, _sampling_params(args), args.batch_size))
        write_rows(output, answered, progress, on_row=name_its_line)
    finally:
        if output is not None:
            output.close()
    progress.finish()
    return 1 if progress.failed else 0


def _announce_replicas_model(model: str | None) -> None:
    """Name the model the Ray replicas load, before they start. It is looked for on this machine
    only when none is given (the default); a named one may be a path or id of the cluster's."""
    from .hub import announce_model, default_model_dir

    if model is not None:
        announce_model(model, None)
        return
    try:
        announce_model(None, default_model_dir())
    except Qwen2VLError:
        pass  # the replicas say what is missing


def _read_input(path: str, max_line_bytes: int) -> list[dict]:
    """The conversations of --input (`-`: standard input), each id once (a repeated id could not be
    answered exactly once); a line over `max_line_bytes`, or without an id, as a row whose prompt
    is its error."""
    from .batch_job import id_key, read_conversations

    if path != "-" and not Path(path).is_file():
        raise InputError(f"--input {path}: no such file", field="input")
    records, first_line = read_conversations(path, max_line_bytes), {}
    name = "stdin" if path == "-" else path
    for record in records:
        line = first_line.setdefault(id_key(record["id"]), record["line"])
        if line != record["line"]:
            raise InputError(f"{name}: line {record['line']}: id {record['id']!r} is also on line {line}; "
                             "ids must be unique", field="input")
        if "error" in record:
            record["prompt"] = record.pop("error")
    return records


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _add_limit_options(parser: argparse.ArgumentParser) -> None:
    """Every `ServerLimits` field as an option, with its default and help."""
    from .server.limits import ServerLimits, flag

    group = parser.add_argument_group("limits")
    for f in dataclasses.fields(ServerLimits):
        name = flag(f)
        group.add_argument(name, dest=f.name, metavar=name[2:].upper().replace("-", "_"),
                           type=float if "float" in f.type else int, default=f.default, help=f.metadata.get("help"))


def cmd_serve(args: argparse.Namespace) -> int:
    from .hub import model_id
    from .processor.fetch import MediaPolicy
    from .server.limits import ServerLimits

    try:
        from .server import serve
    except ModuleNotFoundError as error:
        raise Qwen2VLError(f"serve needs the server extra ({error.name} is not installed): "
                           "pip install 'qwen2vl[server]', or from a clone pip install -e '.[server]'") from None
    if args.docs:
        from .server.openapi import swagger_ui_files

        try:
            swagger_ui_files()
        except ImportError as error:
            raise Qwen2VLError(str(error)) from None

    limits = ServerLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerLimits)})
    allowed_dir = Path(args.allowed_media_dir) if args.allowed_media_dir else None
    media = MediaPolicy(allow_remote=args.allow_remote_media, max_bytes=args.max_media_bytes,
                        timeout=args.fetch_timeout, allowed_dir=allowed_dir)
    default_params = _sampling_params(args)
    default_params.validate()  # a bad flag is the operator's error, not every client's 400
    api_key = args.api_key or os.environ.get("QWEN2VL_API_KEY")
    if args.cache_salt_by_key and not api_key:
        raise InputError("--cache-salt-by-key gives each API key its own cache: give the keys "
                         "(--api-key or $QWEN2VL_API_KEY)")
    llm = _load(args)
    model_name = args.served_model_name or model_id(args.model, llm.model_dir)
    url = f"http://{f'[{args.host}]' if ':' in args.host else args.host}:{args.port}/v1"
    if not api_key and not _is_loopback(args.host):
        print(f"qwen2vl: warning: --host {args.host} accepts connections from other machines and no API key is "
              "set: anyone who can reach the port can use the model (set --api-key or $QWEN2VL_API_KEY)",
              file=sys.stderr)
    print(f"[serving {llm.model_dir} as model {model_name!r} at {url}"
          f"{', API key required' if api_key else ''}]", file=sys.stderr)
    serve(llm, model_name=model_name, host=args.host, port=args.port, limits=limits, media=media,
          api_key=api_key, log_level=args.log_level, default_params=default_params,
          cache_salt_by_key=args.cache_salt_by_key, docs=args.docs)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .quantize import BUILT_IN_CALIBRATION, default_calibration, quantize, read_calibration

    if args.bits != 4:
        raise InputError(f"--bits {args.bits}: only 4-bit AWQ GEMM checkpoints are written")
    if args.calibration == BUILT_IN_CALIBRATION:
        calibration = default_calibration()
    else:
        calibration = read_calibration(args.calibration) if args.calibration else None
    start = time.perf_counter()
    out = quantize(args.model_dir, args.out_dir, method=args.method, group_size=args.group_size,
                   calibration=calibration, log=lambda line: print(line, file=sys.stderr), overwrite=args.force)
    print(f"[wrote {args.method} 4-bit checkpoint {out} in {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .api import Qwen2VL
    from .evals.runner import evaluate_fresh, format_scores
    from .evals.shapes import TASKS
    from .progress import ProgressLine

    tasks = tuple(args.only) if args.only else TASKS
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise InputError(f"--only {unknown[0]}: expected one of {', '.join(TASKS)}")
    if args.n < 1:
        raise InputError(f"--n {args.n}: expected an integer >= 1", field="n")
    line = ProgressLine()
    llm = Qwen2VL.from_pretrained(args.model_dir, device=args.device, dtype=args.dtype, progress=line.update)
    line.close()
    line = ProgressLine()
    scores = evaluate_fresh(llm, args.n, args.seed, tasks, batch_size=args.batch_size,
                            progress=lambda done, total: line.update(f"[{done}/{total} samples]", done, total))
    line.finish(f"[{sum(s.total for s in scores.values())} samples in {line.elapsed():.0f} s]")
    print(format_scores(scores))
    if args.show_failures:
        for task, score in scores.items():
            for expected, answered in score.failures:
                print(f"{task}: expected {expected!r}, answered {answered!r}")
    if args.json:
        Path(args.json).write_text(json.dumps({task: {"correct": s.correct, "total": s.total}
                                               for task, s in scores.items()}, indent=2) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen2vl", description="Run Qwen2-VL vision-language models.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = commands.add_parser("chat", help="answer one prompt, or chat interactively",
                               description="Answer PROMPT about the given images/videos; without PROMPT, "
                                           "chat interactively (multi-turn).")
    chat.add_argument("prompt", nargs="?", help="the question; omit for an interactive chat")
    chat.add_argument("--image", action="append", metavar="PATH_OR_URL", help="an image (repeatable)")
    chat.add_argument("--video", action="append", metavar="PATH", help="a video file (repeatable)")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--draw-boxes", metavar="OUT.png", help="draw the answer's grounding boxes and points on the last image")
    chat.add_argument("--timing", action="store_true", help="print load time, time to first token and speed")
    _add_model_options(chat)
    _add_sampling_options(chat)
    chat.set_defaults(run=cmd_chat)

    generate = commands.add_parser("generate", help="answer every conversation of a JSONL file, batched",
                                   description="Each input line is an object with 'id' (unique) and 'messages'. "
                                               "Writes one JSON line per conversation: id, text, "
                                               "finish_reason, usage; or id, error for one that cannot run "
                                               "(a line without an id: its line number stands in). Exit "
                                               "status 1: some rows failed.")
    generate.add_argument("--input", required=True, metavar="IN.jsonl",
                          help="relative media paths in it are relative to its folder; -: standard input; "
                               "with --ray also .parquet, a folder, or a URI such as s3://...")
    generate.add_argument("--output", metavar="OUT.jsonl",
                          help="written as OUT.jsonl.partial, moved into place at the end (with --ray also "
                               ".parquet); - or none: standard output")
    generate.add_argument("--batch-size", type=int, default=64, help="conversations submitted together")
    generate.add_argument("--resume", action="store_true",
                          help="answer only the ids not yet in --output (or its .partial file of a stopped job)")
    generate.add_argument("--max-line-bytes", type=int, metavar="N",
                          help="an input line longer than this (base64 media included) is an error row, not "
                               f"read (default: {MAX_LINE_BYTES >> 20} MiB)")
    group = generate.add_argument_group("Ray cluster (pip install 'qwen2vl[ray]'; see docs/distributed.md)")
    group.add_argument("--ray", action="store_true",
                       help="run over a Ray cluster: --input and --output may be JSONL or Parquet, local or URIs")
    group.add_argument("--ray-address", metavar="auto|ray://HOST:10001",
                       help="the cluster to join (default: $RAY_ADDRESS, else a local one on this machine)")
    group.add_argument("--num-replicas", type=int, help="model replicas (actors; default: 1)")
    group.add_argument("--cpus-per-replica", type=int, default=1,
                       help="CPUs and PyTorch threads per replica without a GPU (with GPUs: one GPU each)")
    group.add_argument("--verbose", action="store_true",
                       help="show Ray's own progress bars, logs and warnings, and the workers' output "
                            "(default: only this job's progress and errors)")
    _add_model_options(generate)
    _add_sampling_options(generate)
    generate.set_defaults(run=cmd_generate)

    from .server.limits import SERVER_MEDIA as media
    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server",
                                description="Serve /v1/chat/completions, /v1/completions, /v1/models, /health "
                                            "and /metrics, streaming included, to many clients at once.")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", metavar="NAME",
                       help="the model id clients send and /v1/models lists (default: a hub id as given, a "
                            "directory's folder name)")
    serve.add_argument("--api-key", nargs="+", action="extend", metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on the API (the page at /, /health, /openapi.json "
                            "and /docs stay open); with several (--api-key A B, or the flag repeated), any one of them "
                            "(default: $QWEN2VL_API_KEY; unset = no key)")
    serve.add_argument("--cache-salt-by-key", action="store_true",
                       help="each API key its own prefix and vision cache: a request reuses (and can time) only "
                            "prompts sent with its own key (default: one cache shared by all, which is faster)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--docs", action="store_true",
                       help="serve Swagger UI at /docs, from the fastapi-offline package (pip install 'qwen2vl[docs]') "
                            "(default: off; /openapi.json is always served)")
    group = serve.add_argument_group("media sources")
    group.add_argument("--allow-remote-media", action="store_true",
                       help="fetch http(s) image/video URLs (never from loopback, private or link-local addresses)")
    group.add_argument("--allowed-media-dir", metavar="DIR", help="serve local files under DIR (default: none)")
    group.add_argument("--max-media-bytes", type=int, default=media.max_bytes, help="per fetched or inline image/video")
    group.add_argument("--fetch-timeout", type=float, default=media.timeout, help="seconds, per remote fetch")
    _add_limit_options(serve)
    _add_model_options(serve)
    _add_sampling_options(serve, "sampling defaults (for the fields a request leaves unset; "
                                 "unset here = the checkpoint's generation_config.json)", structured=False)
    serve.set_defaults(run=cmd_serve)

    quantize = commands.add_parser("quantize", help="4-bit AWQ (or round-to-nearest) checkpoint of a model",
                                   description="Quantize the text decoder's linears to 4 bits with zero points, "
                                               "written in the AutoAWQ GEMM format; the vision tower stays "
                                               "unquantized, as in the Qwen2-VL AWQ card's checkpoint.")
    quantize.add_argument("model_dir", metavar="MODEL_DIR", help="a bf16/fp16/fp32 checkpoint directory")
    quantize.add_argument("out_dir", metavar="OUT_DIR")
    quantize.add_argument("--method", choices=["awq", "rtn"], default="awq",
                          help="awq: activation-aware scales and clipping; rtn: round to nearest (baseline)")
    quantize.add_argument("--bits", type=int, default=4)
    quantize.add_argument("--group-size", type=int, default=128,
                          help="inputs sharing one scale and zero (must divide every decoder linear's inputs; "
                               "the bundled demo model needs 64)")
    quantize.add_argument("--force", action="store_true",
                          help="write into OUT_DIR even if it is not empty (replacing the checkpoint in it)")
    quantize.add_argument("--calibration", metavar="CONVS.jsonl|shapes",
                          help="AWQ calibration conversations like those the model will answer, one list of "
                               "messages per line; 'shapes': the built-in synthetic shapes-task set (default "
                               "for the bundled demo model only; any other model needs this flag with --method awq)")
    quantize.set_defaults(run=cmd_quantize)

    evaluate = commands.add_parser("eval", help="accuracy on a synthetic task, per prompt type",
                                   description="Greedy answers to N freshly generated samples (seeded), dealt "
                                               "in turn to the prompt types; boxes count as correct at IoU >= 0.5.")
    evaluate.add_argument("model_dir", metavar="MODEL_DIR")
    evaluate.add_argument("--task", choices=["shapes"], default="shapes")
    evaluate.add_argument("--n", type=int, default=3500,
                          help="samples in all, dealt in turn to the prompt types (default: 3500, 500 of each of "
                               "the 7; --n 700 is 100 each)")
    evaluate.add_argument("--seed", type=int, default=2024)
    evaluate.add_argument("--only", action="append", metavar="TYPE", help="one prompt type (repeatable)")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--dtype", default="auto")
    evaluate.add_argument("--show-failures", action="store_true", help="print a few wrong answers per type")
    evaluate.add_argument("--json", metavar="OUT.json", help="also write the counts as JSON")
    evaluate.set_defaults(run=cmd_eval)
    return parser


class _StderrLines(logging.Handler):
    """The library's log records as the command's own lines on stderr (`qwen2vl: loading ...`,
    `qwen2vl: warning: ...`); sys.stderr is looked up per record, so a redirection applies."""

    def emit(self, record: logging.LogRecord) -> None:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        try:
            print(f"qwen2vl: {level}{self.format(record)}", file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - a log line never takes the command down
            self.handleError(record)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logger, handler = logging.getLogger("qwen2vl"), _StderrLines()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # which model loads, and the library's notes
    try:
        return args.run(args)
    except Qwen2VLError as error:
        print(f"qwen2vl: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
