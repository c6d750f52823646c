"""The Python API: one object that loads a checkpoint and answers conversations.

    from qwen2vl import Qwen2VL
    llm = Qwen2VL.from_pretrained("Qwen/Qwen2-VL-2B-Instruct-AWQ")
    print(llm.chat([{"role": "user", "content": [
        {"type": "image", "image": "photo.jpg"}, {"type": "text", "text": "Describe this image."}]}]).text)
"""
from __future__ import annotations

import json
import os
import queue
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .engine.block_manager import check_cache_salt
from .engine.driver import EngineDriver, NewRequest
from .engine_args import EngineArgs
from .errors import InputError
from .grounding import Box, Point, parse_boxes, to_image
from .hub import announce_model, resolve_model_dir
from .processor.types import PreparedPrompt
from .processor.pool import media_map
from .reasoning import ReasoningParser, split_reasoning
from .sampling_params import SamplingParams

Messages = list[dict]


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Completion:
    """The answer to one conversation. A thinking model's answer is `text`, what it thought
    before it `reasoning` (see `qwen2vl.reasoning`)."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    usage: Usage
    logprobs: list[dict[int, float]] | None = None
    raw_text: str = ""  # decoded with special tokens kept: what grounding boxes are parsed from
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) of each input image
    resized_image_sizes: list[tuple[int, int]] = field(default_factory=list)  # each as the model saw it
    model_type: str = "qwen2_vl"  # the architecture: how its grounding boxes are written
    reasoning: str | None = None  # a thinking model's reasoning (between <think> and </think>), else None

    def boxes(self, image_index: int = -1) -> list[Box | Point]:
        """Grounding boxes (and points) of the answer, in the order written, in pixels of input
        image `image_index` (the prompt's last image unless given; negative counts from the end).

        The architecture's own format is read (`qwen2vl.grounding`): Qwen2-VL's box tokens,
        Qwen2.5-VL's JSON in pixels of the resized image (mapped back through the processor's
        resize), Qwen3-VL's JSON in [0, 1000); a thinking model's boxes are read from its answer,
        not its reasoning. Without an input image, they stay in the model's coordinates.
        """
        answer = self.raw_text if self.reasoning is None else self.raw_text.rpartition("</think>")[2]
        marks = parse_boxes(answer, self.model_type)
        if not self.image_sizes:
            return marks
        count = len(self.image_sizes)
        if not -count <= image_index < count:
            raise InputError(f"image_index {image_index}: the conversation has {count} image(s)")
        resized = self.resized_image_sizes[image_index] if self.resized_image_sizes else None
        return to_image(marks, self.model_type, self.image_sizes[image_index], resized)


def _is_final(item) -> bool:
    return isinstance(item, BaseException) or item.finished


def _pick_device(device: str | torch.device) -> torch.device:
    """`device` as a torch device this machine has ("auto": cuda if present, else cpu); raises
    `InputError` naming the device and the ones available."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        return torch.device("cuda" if gpus else "cpu")
    available = "available: cpu" + (f", cuda (cuda:0 to cuda:{gpus - 1})" if gpus > 1 else ", cuda" if gpus else "")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        chosen = None
    if chosen is None or chosen.type not in ("cpu", "cuda"):
        raise InputError(f"device {str(device)!r} is not supported; {available}", field="device")
    if chosen.type == "cuda" and not gpus:
        raise InputError(f"device {str(device)!r}: this machine has no CUDA GPU that torch can use; {available}",
                         field="device")
    if chosen.type == "cuda" and (chosen.index or 0) >= gpus:
        raise InputError(f"device {str(device)!r}: this machine has {gpus} CUDA GPU(s); {available}", field="device")
    return chosen


def _pick_dtype(dtype: str | torch.dtype) -> torch.dtype | None:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None  # the loader picks per device and checkpoint: `qwen2vl.loader.default_dtype`
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise InputError(f"dtype {dtype!r}: expected one of auto, {', '.join(names)}")
    return names[dtype]


class ChatStream:
    """Text deltas of one answer as they are generated; `.completion` once exhausted.

    Leaving the iteration early (break, an exception, KeyboardInterrupt) or dropping the stream,
    iterated or not, aborts the request and frees its cache.
    """

    def __init__(self, llm: "Qwen2VL", prompt, params: SamplingParams, cache_salt: str | None = None):
        self._llm, self._prompt = llm, prompt
        self._outputs: queue.SimpleQueue = queue.SimpleQueue()
        [request_id] = llm._submit([prompt], params, self._outputs.put, several=False, cache_salt=cache_salt)
        # The abort holds no reference to the stream, so it runs when the stream is collected,
        # even from a reference cycle in the middle of a step (it only marks the request).
        self._abort = weakref.finalize(self, llm.driver.abort, request_id)
        self._abort.atexit = False
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        """The answer's text deltas (a thinking model's reasoning left out: see `parts`)."""
        return (content for _, content in self.parts() if content)

    def parts(self) -> Iterator[tuple[str, str]]:
        """(reasoning, answer) text deltas: a thinking model's reasoning first, then its answer;
        the reasoning is "" for a model that does not think."""
        thinking = self._llm.engine.thinking
        parser = ReasoningParser(thinking.opened_by_prompt) if thinking is not None else None
        try:
            while self.completion is None:
                self._llm.driver.pump(lambda: not self._outputs.empty())
                output = self._outputs.get()
                if isinstance(output, BaseException):
                    raise output
                if output.error:
                    raise InputError(output.error)
                if parser is None:
                    part = ("", output.text_delta)
                else:
                    part = parser.feed(output.text_delta)
                    if output.finished:
                        rest = parser.finish()
                        part = (part[0] + rest[0], part[1] + rest[1])
                if any(part):
                    yield part
                if output.finished:
                    self._abort.detach()
                    self.completion = self._llm._completion(self._prompt, output)
        finally:
            self._abort()  # a no-op once finished


class Qwen2VL:
    """A loaded checkpoint with its processor and a continuous-batching engine."""

    def __init__(self, engine, processor, model_dir: Path):
        self.engine = engine
        self.driver = EngineDriver(engine)  # steps the engine for every consumer: calls, streams, the server
        self.processor = processor
        self.model_dir = model_dir

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike | None = None, args: EngineArgs | None = None, *,
                        progress: Callable[[str, int | None, int | None], None] | None = None,
                        **fields) -> "Qwen2VL":
        """Load `model` (a checkpoint directory or a hub id; None: the card's AWQ checkpoint if
        cached, else the bundled demo model: a warning on the `qwen2vl` logger says so; the
        model loaded is logged at INFO). `fields` are `EngineArgs`' (device, dtype,
        min_pixels, max_pixels, max_model_len, int8_vocab, max_num_seqs, ...), or give `args`.
        A 4-bit checkpoint on its int4 kernel keeps the vocabulary table as int8 rows (half the
        head's bytes per token) unless `int8_vocab` is False. `progress(text, done, total)` hears how
        the weights' loading goes (the CLI draws it: `qwen2vl.progress.ProgressLine.update`)."""
        from .engine import LLMEngine
        from .loader import load_model
        from .model.registry import parse_config
        from .processor import Processor

        if args is None:
            args = EngineArgs.from_keywords(model=model, **fields)
        elif fields or model is not None:
            raise TypeError("give either args or its fields as keywords, not both")
        device, dtype = _pick_device(args.device), _pick_dtype(args.dtype)
        model_dir = resolve_model_dir(args.model)
        announce_model(args.model, model_dir)
        config = parse_config(model_dir)  # the one read of config.json: the model's and the processor's settings
        processor = Processor.from_pretrained(model_dir, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                                              settings=config.processor_settings)
        network = load_model(model_dir, device=device, dtype=dtype, int8_vocab=args.int8_vocab,
                             config=config, progress=progress)
        generation_config_path = model_dir / "generation_config.json"
        generation_config = json.loads(generation_config_path.read_text()) if generation_config_path.is_file() else {}
        engine = LLMEngine(network, processor, args, generation_config=generation_config)
        return cls(engine, processor, model_dir)

    def chat(self, messages: Messages | list[Messages], params: SamplingParams | None = None, *,
             stream: bool = False, cache_salt: str | None = None, **overrides):
        """Answer one conversation (a list of messages) or a batch of them.

        One conversation returns a `Completion`; a list of conversations returns a list of them,
        run together as one continuous batch. `stream=True` (one conversation) returns a `ChatStream` of text deltas.
        Keyword overrides set `SamplingParams` fields, under vLLM's or transformers' names
        (`max_tokens` / `max_new_tokens`, `temperature`, `do_sample`, ...). With `cache_salt`
        (a string), cached prompt blocks and image encodings are shared only with requests of
        the same salt.
        """
        check_cache_salt(cache_salt)
        params = SamplingParams.from_overrides(params, **overrides)
        several = bool(messages) and isinstance(messages, list) and all(isinstance(m, list) for m in messages)
        if stream:
            if several:
                raise InputError("stream=True takes one conversation, not a list of conversations")
            return self._stream(messages, params, cache_salt)
        conversations = messages if several else [messages]
        prompts = media_map(lambda pair: self._prepare(pair[1], pair[0] if several else None), enumerate(conversations))
        completions = self._complete(prompts, params, several, cache_salt)
        return completions if several else completions[0]

    def complete(self, prompts: list[PreparedPrompt], params: SamplingParams | None = None, *,
                 cache_salt: str | None = None, **overrides) -> list[Completion]:
        """Answer prompts prepared ahead (`llm.processor.prepare(messages)`, possibly in another
        process) as one continuous batch, as `chat` answers a list of conversations."""
        check_cache_salt(cache_salt)
        return self._complete(prompts, SamplingParams.from_overrides(params, **overrides), True, cache_salt)

    def _complete(self, prompts: list[PreparedPrompt], params: SamplingParams, several: bool,
                  cache_salt: str | None) -> list[Completion]:
        finals: queue.SimpleQueue = queue.SimpleQueue()
        request_ids = self._submit(prompts, params, lambda item: _is_final(item) and finals.put(item), several,
                                   cache_salt)
        finished = {}
        try:
            while len(finished) < len(request_ids):
                self.driver.pump(lambda: not finals.empty())
                output = finals.get()
                if isinstance(output, BaseException):
                    raise output
                finished[output.request_id] = output
        finally:
            self._abort([request_id for request_id in request_ids if request_id not in finished])
        return [self._completion(prompt, finished[request_id]) for prompt, request_id in zip(prompts, request_ids)]

    def _submit(self, prompts, params: SamplingParams, sink, several: bool, cache_salt: str | None) -> list[str]:
        """Hand the prompts to the engine together; their request ids. If the engine refuses
        one, none of them runs and its error is raised, naming its conversation when `several`
        (the caller gave a list of conversations). Interrupted, it aborts them whenever the engine
        takes them."""
        accepted = self.driver.submit([NewRequest(prompt, params, cache_salt=cache_salt) for prompt in prompts], sink)
        try:
            self.driver.pump(accepted.done)
        except BaseException:
            accepted.add_done_callback(lambda added: self._abort(added.result()))
            raise
        results = accepted.result()
        refused = [(index, error) for index, error in enumerate(results) if isinstance(error, BaseException)]
        if refused:
            self._abort(results)
            index, error = refused[0]
            raise error.in_conversation(index) if several and isinstance(error, InputError) else error
        return results

    def _abort(self, request_ids: list[str | BaseException]) -> None:
        """Abort the requests (errors in the list, for requests never added, are skipped). It
        never waits: their blocks are free now, or after the step that runs meanwhile."""
        for request_id in request_ids:
            if not isinstance(request_id, BaseException):
                self.driver.abort(request_id)

    def _prepare(self, conversation: Messages, conversation_index: int | None):
        try:
            return self.processor.prepare(conversation, context_len=self.engine.max_model_len)
        except InputError as error:
            if conversation_index is None:
                raise
            raise error.in_conversation(conversation_index) from None

    def _stream(self, messages: Messages, params: SamplingParams, cache_salt: str | None) -> "ChatStream":
        return ChatStream(self, self._prepare(messages, None), params, cache_salt)

    def _completion(self, prompt, output) -> Completion:
        if output.error:
            raise InputError(output.error)
        images = [item for item in prompt.vision_items if item.kind == "image"]
        reasoning, text = split_reasoning(output.text, self.engine.thinking)
        return Completion(
            text=text,
            reasoning=reasoning,
            token_ids=list(output.token_ids),
            finish_reason=output.finish_reason,
            usage=Usage(len(prompt.input_ids), len(output.token_ids), output.num_cached_tokens),
            logprobs=output.logprobs,
            raw_text=self.processor.tokenizer.decode(output.token_ids, skip_special_tokens=False),
            image_sizes=[item.original_size for item in images],
            resized_image_sizes=[item.resized_size for item in images],
            model_type=self.engine.config.model_type,
        )
