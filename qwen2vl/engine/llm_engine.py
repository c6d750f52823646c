"""The engine: requests in, one batched step at a time, outputs out."""
from __future__ import annotations

import dataclasses
import itertools
from concurrent.futures import Future

import torch

from qwen2vl.engine.step_batch import LaunchedStep
from qwen2vl.engine.block_manager import BlockManager, check_cache_salt
from qwen2vl.engine.model_runner import ModelRunner, kv_cache_bytes_per_block
from qwen2vl.engine.run_ahead import must_read_back_first
from qwen2vl.engine.scheduler import Scheduler, StepPlan, VisionWork
from qwen2vl.engine.sequence import RequestOutput, Sequence
from qwen2vl.engine.vision_cache import VisionCache
from qwen2vl.engine_args import EngineArgs
from qwen2vl.errors import InputError
from qwen2vl.processor.tokenizer import IncrementalDetokenizer
from qwen2vl.processor.types import PreparedPrompt
from qwen2vl.reasoning import thinking_tags
from qwen2vl.sampling_params import SamplingParams
from qwen2vl.structured import CACHE_BYTES as GRAMMAR_CACHE_BYTES
from qwen2vl.structured import GrammarCompiler

_CPU_KV_CACHE_MAX_BYTES = 1 << 30
_CPU_KV_CACHE_SEQS = 4  # on CPU the default pool holds this many sequences of max_model_len
_GPU_MEMORY_FRACTION = 0.85  # of the memory free after loading the model, for the KV cache
_GPU_RESERVE_BYTES = 1 << 30  # left for activations and the vision encoder
# Vision encoder outputs kept for reuse: a 448x448 image's 256 rows of 1536 are 0.75-1.5 MiB.
_CPU_VISION_CACHE_BYTES = 256 << 20
_GPU_VISION_CACHE_BYTES = 1 << 30


class LLMEngine:
    """Continuous batching over a paged KV cache.

    `add_request` queues a prepared prompt; each `step` schedules waiting and running requests
    under the token budget, runs the model once over all of them and returns a `RequestOutput`
    for every request that got a token or finished. A request that fails on its own (such as a
    broken image in the vision encoder) finishes with `finish_reason="error"`; the others go on.

    `EngineArgs` sizes it. The KV pool is `num_kv_blocks` blocks of `block_size` tokens, or as many as fit in
    `kv_cache_memory` bytes; by default most of the free GPU memory, or on CPU room for a few
    sequences of `max_model_len` (at most 1 GiB). `max_model_len` (prompt plus output) defaults
    to the model's `max_position_embeddings`, capped by the pool. `generation_config` is the
    checkpoint's generation_config.json: defaults for unset sampling fields, and its
    `eos_token_id`s (else the model config's) end generation. `cuda_graphs`: replay decode steps
    from CUDA graphs (default: on CUDA with float16/bfloat16 weights, where the Triton decode
    kernels run; see `engine.cuda_graphs`).

    `run_ahead` (default: on CUDA) launches each step before reading back the last one's tokens:
    the sequences' next input tokens stay on the device, so the host schedules, prepares and
    detokenizes while the device computes, instead of in turn. A step then returns the outputs
    of the step before it; a sequence that stops computes one token more, which is dropped.
    `engine.run_ahead` says what is pending when and when a step waits for the read-back.
    """

    def __init__(self, model, processor, args: EngineArgs | None = None, *, generation_config: dict | None = None,
                 **fields):
        """`args` (or its fields as keywords) size the engine; its loading fields are not read here."""
        if args is None:
            args = EngineArgs.from_keywords(**fields)
        elif fields:
            raise TypeError("give either args or its fields as keywords, not both")
        self.args = args
        self.model = model
        self.processor = processor
        self.config = model.config
        self.generation_config = dict(generation_config or {})
        self.device = model.device

        text = self.config.text
        block_size, num_kv_blocks, max_model_len = args.block_size, args.num_kv_blocks, args.max_model_len
        block_bytes = kv_cache_bytes_per_block(text.num_layers, text.num_kv_heads, text.head_dim, block_size, model.dtype)
        if num_kv_blocks is None:
            kv_cache_memory = args.kv_cache_memory or self._default_kv_cache_memory(block_bytes // block_size, max_model_len)
            num_kv_blocks = kv_cache_memory // block_bytes
        capacity = num_kv_blocks * block_size
        if max_model_len is None:
            max_model_len = min(text.max_position_embeddings, capacity)
        elif max_model_len > capacity:
            raise InputError(
                f"max_model_len={max_model_len} does not fit the KV cache of {num_kv_blocks} blocks x "
                f"{block_size} tokens = {capacity} tokens; lower max_model_len or give more KV cache memory",
                field="max_model_len",
            )
        self.max_model_len = max_model_len

        self.block_manager = BlockManager(num_kv_blocks, block_size, prefix_caching=args.prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_vision_tokens_per_step=args.max_vision_tokens_per_step or args.max_num_batched_tokens,
            max_model_len=max_model_len,
        )
        self.runner = ModelRunner(model, num_blocks=num_kv_blocks, block_size=block_size, max_num_seqs=args.max_num_seqs,
                                  max_model_len=max_model_len, cuda_graphs=args.cuda_graphs)

        eos = self.generation_config.get("eos_token_id", self.config.eos_token_id)
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos])
        self.grammars = GrammarCompiler(processor.tokenizer.backend.to_str, self.eos_token_ids, GRAMMAR_CACHE_BYTES
                                        if args.grammar_cache_bytes is None else args.grammar_cache_bytes)
        self.detect_thinking()
        # Each request's vision embeddings, item by item, from its encoding to its end.
        self._vision_embeds: dict[str, dict[int, torch.Tensor]] = {}
        self.vision_cache = VisionCache(self._default_vision_cache_bytes() if args.vision_cache_bytes is None
                                        else args.vision_cache_bytes)
        self._ids = itertools.count()
        self.run_ahead = self.device.type == "cuda" if args.run_ahead is None else args.run_ahead
        self._in_flight: LaunchedStep | None = None  # launched, tokens not read back yet

    def detect_thinking(self) -> None:
        """Whether the model thinks (`reasoning.thinking_tags`), from the processor's template: again
        when the template is replaced. A thinking model's answers are split from their reasoning,
        and its constraints apply after the reasoning."""
        self.thinking = thinking_tags(self.config.model_type, self.processor.tokenizer, self.processor.template)
        self.grammars.thinking = self.thinking

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.block_manager.num_blocks

    @property
    def cache_counters(self) -> dict[str, int]:
        """Totals since start: prompt tokens looked up in and found in the prefix cache, vision
        items found in the vision cache."""
        manager = self.block_manager
        return {"prefix_cache_queried_tokens": manager.num_queried_tokens,
                "prefix_cache_hit_tokens": manager.num_hit_tokens, "vision_cache_hits": self.vision_cache.num_hits}

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def has_request(self, request_id: str) -> bool:
        """Whether the request is in the engine (added, not finished or aborted yet)."""
        return request_id in self.scheduler.requests

    def compile_constraint(self, params: SamplingParams | None) -> Future | None:
        """Start compiling the structured-output constraint of `params` on the grammar compiler's
        threads (from any thread), so that `add_request` finds it compiled and the thread that
        steps the engine never compiles; its future, or None without one or for invalid params
        (`add_request` then says what is wrong)."""
        try:
            constraint = self._resolve(params).constraint
        except InputError:
            return None
        return None if constraint is None else self.grammars.compile(*constraint)

    def _resolve(self, params: SamplingParams | None) -> SamplingParams:
        return (params or SamplingParams()).resolve(self.generation_config, self.config.text.vocab_size)

    def add_request(self, prompt: PreparedPrompt, params: SamplingParams | None = None, request_id: str | None = None,
                    *, cache_salt: str | None = None) -> str:
        """Validate and queue a request; returns its id. Raises `InputError` for a bad request
        (which leaves the engine and its other requests untouched). A constraint not compiled
        yet (see `compile_constraint`) is compiled first, this thread waiting.

        With a `cache_salt`, the request shares cached blocks and vision encodings only with
        requests of the same salt (None: with all unsalted requests)."""
        check_cache_salt(cache_salt)
        params = self._resolve(params)
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        elif request_id in self.scheduler.requests:
            raise InputError(f"request id {request_id!r} is already in use")
        self._validate_prompt(prompt)
        stop_token_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        constraint = None
        if params.constraint is not None:
            constraint = self.grammars.constraint(*params.constraint)
        merge = self.config.vision.spatial_merge_size
        item_tokens = [item.num_tokens(merge) for item in prompt.vision_items]
        seq = Sequence(
            request_id,
            prompt,
            params,
            vision_token_ids=[self.config.image_token_id, self.config.video_token_id],
            stop_token_ids=stop_token_ids,
            detokenizer=IncrementalDetokenizer(self.processor.tokenizer, skip_special_tokens=params.skip_special_tokens),
            generator=generator,
            item_tokens=item_tokens,
            constraint=constraint,
            cache_salt=cache_salt,
        )
        if seq.num_vision_tokens != sum(item_tokens):
            raise InputError(
                f"the prompt has {seq.num_vision_tokens} image/video pad tokens but its "
                f"{len(prompt.vision_items)} vision item(s) make {sum(item_tokens)} embeddings"
            )
        self.scheduler.add(seq)
        return request_id

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; outputs of the requests that got tokens or finished (with
        `run_ahead`, the tokens of the step before). If it raises (a failure, or a
        KeyboardInterrupt anywhere in it), the engine stays usable: its requests start over."""
        try:
            outputs = []
            if self._in_flight is not None and not self._can_run_ahead(self._in_flight):
                outputs += self._read_back()
            plan = self.scheduler.schedule()
            failed = self._encode_vision(plan.encode)
            if failed:
                outputs += [self._finish(seq) for seq in failed]
                plan = plan.without({seq.request_id for seq in failed})
            launched = self.runner.launch(plan, self._in_flight, self._vision_rows) if plan.spans else None
            if self._in_flight is not None:
                outputs += self._read_back()
            self._in_flight = launched
            if launched is not None and not self.run_ahead:
                outputs += self._read_back()
            return outputs
        except BaseException:
            self._restart()
            raise

    def _restart(self) -> None:
        """A step failed or was interrupted (KeyboardInterrupt) anywhere: the tokens of the steps
        scheduled and not read back will never arrive, and the queues may be half updated. Every
        request starts over from the tokens it has, as a preempted one does (its vision
        embeddings kept); those that finished are taken out."""
        self._in_flight = None
        self.scheduler.restart()
        for request_id in [request_id for request_id in self._vision_embeds if not self.has_request(request_id)]:
            del self._vision_embeds[request_id]
        for seq in self.scheduler.requests.values():  # items planned for encoding in the lost step may lack theirs
            seq.encoded_items.intersection_update(self._vision_embeds.get(seq.request_id, {}))

    def _can_run_ahead(self, launched: LaunchedStep) -> bool:
        """Whether the next step may be scheduled before `launched`'s tokens are read back."""
        return self.run_ahead and not must_read_back_first(launched, self.scheduler.requests, self.max_model_len)

    def _read_back(self) -> list[RequestOutput]:
        """The in-flight step's tokens handed to the scheduler; the outputs of the requests
        that took one (those finished or aborted since it was launched drop theirs)."""
        launched, self._in_flight = self._in_flight, None
        updated = self.scheduler.update(launched.plan, launched.result(), launched.prompt_logprobs())
        return [self._output(seq) for seq in updated]

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks; returns its final output (finish_reason "abort"),
        or None if it is unknown or already finished."""
        seq = self.scheduler.requests.get(request_id)
        if seq is None:
            return None
        seq.finish("abort")
        return self._finish(seq)

    def _encode_vision(self, works: list[VisionWork]) -> list[Sequence]:
        """Encode the images and videos of `works` not in the vision cache, in one encoder call
        (the scheduler admits at most `max_vision_tokens_per_step` of them a step); if it fails,
        one request at a time, so that a broken input fails its own request only. Returns the
        requests that failed."""
        missing = []
        for work in works:
            store = self._vision_embeds.setdefault(work.request_id, {})
            indices, items = [], []
            for index, item in zip(work.indices, work.items):
                # the digest hashes the pixels: not computed when the cache is off
                cached = self.vision_cache.get(work.cache_salt, item.digest) if self.vision_cache.max_bytes else None
                if cached is not None:
                    store[index] = cached
                else:
                    indices.append(index)
                    items.append(item)
            if indices:
                missing.append(dataclasses.replace(work, indices=indices, items=items))
        return self._encode_missing(missing)

    def _encode_missing(self, works: list[VisionWork]) -> list[Sequence]:
        if not works:
            return []
        try:
            for work, embeds in zip(works, self.runner.encode_vision(works)):
                for index, item, item_embeds in zip(work.indices, work.items, embeds):
                    self._vision_embeds[work.request_id][index] = item_embeds
                    if self.vision_cache.max_bytes:
                        self.vision_cache.put(work.cache_salt, item.digest, item_embeds)
            return []
        except Exception as e:
            if len(works) > 1:
                return [seq for work in works for seq in self._encode_missing([work])]
            seq = self.scheduler.requests[works[0].request_id]
            seq.finish("error", f"vision encoding failed: {type(e).__name__}: {e}")
            return [seq]

    def _vision_rows(self, request_id: str, start: int, end: int) -> torch.Tensor:
        """Rows `start:end` of a request's vision embeddings (its items' rows, in prompt order)."""
        seq, store = self.scheduler.requests[request_id], self._vision_embeds[request_id]
        pieces = []
        for index in range(len(seq.prompt.vision_items)):
            item_start, item_end = seq.item_rows(index)
            if item_start < end and item_end > start:
                pieces.append(store[index][max(start, item_start) - item_start:min(end, item_end) - item_start])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _finish(self, seq: Sequence) -> RequestOutput:
        """The final output of a request the engine ended (aborted, or failed on its own)."""
        self.scheduler.remove(seq)
        return self._output(seq)

    def _output(self, seq: Sequence) -> RequestOutput:
        if seq.is_finished:
            self._vision_embeds.pop(seq.request_id, None)
        return seq.take_output()

    def _validate_prompt(self, prompt: PreparedPrompt) -> None:
        if len(prompt) == 0:
            raise InputError("the prompt has no tokens")
        if len(prompt) + 1 > self.max_model_len:
            raise InputError(
                f"the prompt has {len(prompt)} tokens, over the limit of {self.max_model_len - 1} (max_model_len is "
                f"{self.max_model_len}: prompt plus at least one generated token); shorten the prompt, lower the "
                f"image resolution (max_pixels) or raise max_model_len"
            )
        if tuple(prompt.positions.shape) != (3, len(prompt)):
            raise InputError(f"prompt positions have shape {tuple(prompt.positions.shape)}, expected (3, {len(prompt)})")

    def _default_vision_cache_bytes(self) -> int:
        return _GPU_VISION_CACHE_BYTES if self.device.type == "cuda" else _CPU_VISION_CACHE_BYTES

    def _default_kv_cache_memory(self, bytes_per_token: int, max_model_len: int | None) -> int:
        max_len = max_model_len or self.config.text.max_position_embeddings
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(int(free * _GPU_MEMORY_FRACTION) - _GPU_RESERVE_BYTES, bytes_per_token * max_len)
        return min(_CPU_KV_CACHE_MAX_BYTES, _CPU_KV_CACHE_SEQS * max_len * bytes_per_token)

