"""Engine outputs to OpenAI's responses. One formatter writes both chat and text completions,
whole or as stream chunks, with their usage and logprobs; `ChatFormat` and `CompletionFormat`
say only what differs: the models, the id prefix, a choice's text (a message or a delta, or
plain text), the chunk that opens each choice, and the shape of the logprobs."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from functools import lru_cache

from fastapi.responses import Response
from pydantic import BaseModel

from qwen2vl import tool_calls
from qwen2vl.engine.sequence import RequestOutput
from qwen2vl.processor.tokenizer import Tokenizer
from qwen2vl.reasoning import ReasoningParser, ThinkingTags, split_reasoning
from qwen2vl.server.jobs import Job
from qwen2vl.server.replies import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    PromptTokensDetails,
    TextCompletion,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    ToolCallFunction,
    ToolCallFunctionDelta,
    TopLogprob,
    Usage,
)
from qwen2vl.server.requests import ChatCompletionRequest, CompletionRequest

Distribution = dict[int, float]  # token id -> logprob, for the sampled token and the most likely ones


def json_response(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


async def sse_events(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """Stream chunks as server-sent events."""
    async for chunk in chunks:
        # exclude_unset: keys a chunk sets explicitly (even to null) are sent, the others are left out
        yield f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"


class TokenTexts:
    """Each token's text and exact bytes (a token may hold part of a UTF-8 character), cached."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._lookup = lru_cache(maxsize=1 << 16)(self._text_and_bytes)

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        return self._lookup(token_id)

    def _text_and_bytes(self, token_id: int) -> tuple[str, list[int]]:
        data = self._tokenizer.token_bytes(token_id)
        return data.decode("utf-8", errors="replace"), list(data)


class _Format:
    """The responses of one request; a subclass fills in what chat and text completions differ in."""

    id_prefix: str
    response_model: type[BaseModel]
    chunk_model: type[BaseModel]

    def __init__(self, body: ChatCompletionRequest | CompletionRequest, top: int | None, model_name: str,
                 texts: TokenTexts):
        self.body = body
        self.top = top  # logprobs of how many most likely tokens per token; None: no logprobs
        self.model_name = model_name
        self.texts = texts

    def response(self, job: Job, outputs: list[RequestOutput]) -> BaseModel:
        choices = [self._choice(job, index, output, self._logprobs(index, output.token_ids, output.logprobs))
                   for index, output in enumerate(outputs)]
        return self.response_model(id=f"{self.id_prefix}-{job.request_id}", created=int(time.time()),
                                   model=self.model_name, choices=choices, usage=usage(job, outputs))

    async def chunks(self, job: Job) -> AsyncIterator[BaseModel]:
        created, chunk_id = int(time.time()), f"{self.id_prefix}-{job.request_id}"
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)

        def chunk(choices: list[BaseModel], **usage_field) -> BaseModel:
            if include_usage:
                usage_field.setdefault("usage", None)
            return self.chunk_model(id=chunk_id, created=created, model=self.model_name, choices=choices,
                                           **usage_field)

        for index in range(len(job.streams)):
            opening = self._opening(job, index)
            if opening is not None:
                yield chunk([opening])
        # each choice's last output (kept as `self.finals`: complete when the usage chunk comes)
        finals: list[RequestOutput | None] = [None] * len(job.streams)
        self.finals = finals
        async for index, output in job.events():
            if finals[index] is None:
                first = self._before_first(job, index, output)
                if first is not None:
                    yield chunk([first])
            new_logprobs = output.logprobs[len(output.logprobs) - len(output.new_token_ids):] if output.logprobs else None
            logprobs = self._logprobs(index, output.new_token_ids, new_logprobs)
            if output.text_delta or output.finished or logprobs:
                choice = self._chunk_choice(index, output, logprobs)
                if choice is not None:
                    yield chunk([choice])
            finals[index] = output
        if include_usage:
            yield chunk([], usage=usage(job, finals))

    def _logprobs(self, index: int, token_ids: list[int], distributions: list[Distribution] | None):
        """The logprobs of choice `index`'s tokens `token_ids` (the next ones, when streaming)."""
        if self.top is None or distributions is None:
            return None
        return self._shape_logprobs(index, self._rank(token_ids, distributions))

    def _rank(self, token_ids: list[int], distributions: list[Distribution]):
        """Each token's id, distribution and its `top` most likely (id, logprob)."""
        return [(token_id, distribution, sorted(distribution.items(), key=lambda item: -item[1])[:self.top])
                for token_id, distribution in zip(token_ids, distributions)]

    # -- what differs -------------------------------------------------------------------------

    def _opening(self, job: Job, index: int) -> BaseModel | None:
        """The chunk choice streamed for choice `index` before any output, if any."""
        raise NotImplementedError

    def _before_first(self, job: Job, index: int, output: RequestOutput) -> BaseModel | None:
        """The chunk choice streamed for choice `index` before its first output's, if any."""
        return None

    def _choice(self, job: Job, index: int, output: RequestOutput, logprobs) -> BaseModel:
        raise NotImplementedError

    def _chunk_choice(self, index: int, output: RequestOutput, logprobs) -> BaseModel | None:
        """The chunk choice of an output, or None when it has nothing to send yet."""
        raise NotImplementedError

    def _shape_logprobs(self, index: int, ranked: list[tuple[int, Distribution, list[tuple[int, float]]]]):
        """`ranked`: each token's id, distribution and its `top` most likely (id, logprob)."""
        raise NotImplementedError


class ChatFormat(_Format):
    id_prefix, response_model, chunk_model = "chatcmpl", ChatCompletion, ChatCompletionChunk

    def __init__(self, body: ChatCompletionRequest, model_name: str, texts: TokenTexts,
                 thinking: ThinkingTags | None = None):
        super().__init__(body, (body.top_logprobs or 0) if body.logprobs else None, model_name, texts)
        self.thinking = thinking  # a thinking model's tags: its reasoning goes to `reasoning_content`
        self._parsers: dict[int, tool_calls.ToolCallParser] = {}  # choice -> its reply's tool calls so far
        self._reasoning: dict[int, ReasoningParser] = {}  # choice -> its reasoning so far

    def _opening(self, job: Job, index: int) -> ChatChunkChoice:
        return ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""), logprobs=None,
                               finish_reason=None)

    def _choice(self, job: Job, index: int, output: RequestOutput, logprobs) -> ChatChoice:
        reasoning, text = split_reasoning(output.text, self.thinking)
        content, calls = tool_calls.parse_tool_calls(text) if self.body.parses_tool_calls else (text, [])
        if reasoning is not None and not content:
            content = None  # only reasoning (cut off before </think>)
        message = AssistantMessage(content=content, reasoning_content=reasoning, tool_calls=[
            ToolCall(id=call.id, function=ToolCallFunction(name=call.name, arguments=call.arguments)) for call in calls])
        return ChatChoice(index=index, message=message, logprobs=logprobs,
                          finish_reason=_finish_reason(output.finish_reason, calls))

    def _chunk_choice(self, index: int, output: RequestOutput, logprobs) -> ChatChunkChoice | None:
        reasoning, content, deltas, calls = "", output.text_delta, [], []
        if self.thinking is not None:
            parser = self._reasoning.setdefault(index, ReasoningParser(self.thinking.opened_by_prompt))
            reasoning, content = parser.feed(output.text_delta)
            if output.finished:
                rest = parser.finish()
                reasoning, content = reasoning + rest[0], content + rest[1]
        if self.body.parses_tool_calls:
            parser = self._parsers.setdefault(index, tool_calls.ToolCallParser())
            content, deltas = parser.feed(content)
            if output.finished:
                rest, last = parser.finish()
                content, deltas = content + rest, deltas + last
            calls = parser.calls
        if not (reasoning or content or deltas or logprobs or output.finished):
            return None  # held back: it may be the start of a call or of a tag
        delta = ChatDelta(**({"reasoning_content": reasoning} if reasoning else {}),
                          **({"content": content} if content else {}),
                          **({"tool_calls": [_tool_call_delta(delta) for delta in deltas]} if deltas else {}))
        return ChatChunkChoice(index=index, delta=delta, logprobs=logprobs,
                               finish_reason=_finish_reason(output.finish_reason, calls) if output.finished else None)

    def _shape_logprobs(self, index, ranked) -> ChoiceLogprobs:
        content = []
        for token_id, distribution, best in ranked:
            text, data = self.texts(token_id)
            content.append(TokenLogprob(
                token=text, logprob=distribution[token_id], bytes=data,
                top_logprobs=[TopLogprob(token=self.texts(other)[0], logprob=value, bytes=self.texts(other)[1])
                              for other, value in best],
            ))
        return ChoiceLogprobs(content=content)


def _finish_reason(reason: str | None, calls: list) -> str | None:
    """OpenAI's "tool_calls" for a reply that ended by itself with calls."""
    return "tool_calls" if calls and reason == "stop" else reason


def _tool_call_delta(delta: tool_calls.ToolCallDelta) -> ToolCallDelta:
    if delta.id is None:
        return ToolCallDelta(index=delta.index, function=ToolCallFunctionDelta(arguments=delta.arguments))
    return ToolCallDelta(index=delta.index, id=delta.id, type="function",
                         function=ToolCallFunctionDelta(name=delta.name, arguments=delta.arguments))


class CompletionFormat(_Format):
    id_prefix, response_model, chunk_model = "cmpl", TextCompletion, TextCompletion

    def __init__(self, body: CompletionRequest, model_name: str, texts: TokenTexts):
        super().__init__(body, body.logprobs, model_name, texts)
        self._offsets: dict[int, int] = {}  # choice -> text offset of its next token

    def response(self, job: Job, outputs: list[RequestOutput]) -> TextCompletion:
        for index in range(len(outputs)):
            self._offsets[index] = len(self._echo(job, index))  # generated text starts after the echo
        return super().response(job, outputs)

    def _opening(self, job: Job, index: int) -> CompletionChoice | None:
        if not self.body.echo:
            return None
        self._offsets[index] = len(self._echo(job, index))
        if self.top is not None:
            return None  # the prompt's logprobs come with its first output (`_before_first`)
        return CompletionChoice(index=index, text=self._echo(job, index), logprobs=None, finish_reason=None)

    def _before_first(self, job: Job, index: int, output: RequestOutput) -> CompletionChoice | None:
        if not (self.body.echo and self.top is not None):
            return None
        return CompletionChoice(index=index, text=self._echo(job, index), logprobs=self._prompt_logprobs(job, index, output),
                                finish_reason=None)

    def _choice(self, job: Job, index: int, output: RequestOutput, logprobs) -> CompletionChoice:
        if self.body.echo and logprobs is not None:
            prompt = self._prompt_logprobs(job, index, output)
            logprobs = CompletionLogprobs(**{name: getattr(prompt, name) + getattr(logprobs, name)
                                             for name in CompletionLogprobs.model_fields})
        return CompletionChoice(index=index, text=self._echo(job, index) + output.text,
                                finish_reason=output.finish_reason, logprobs=logprobs)

    def _prompt_logprobs(self, job: Job, index: int, output: RequestOutput) -> CompletionLogprobs:
        """The echoed prompt's tokens with their logprobs (none for the first, as OpenAI's legacy API)."""
        first, *rest = job.prompt_of(index).input_ids
        text = self.texts(first)[0]
        scored, _ = self._legacy(self._rank(rest, output.prompt_logprobs[1:]), len(text))
        return CompletionLogprobs(tokens=[text, *scored.tokens], token_logprobs=[None, *scored.token_logprobs],
                                  top_logprobs=[None, *scored.top_logprobs], text_offset=[0, *scored.text_offset])

    def _chunk_choice(self, index: int, output: RequestOutput, logprobs) -> CompletionChoice:
        return CompletionChoice(index=index, text=output.text_delta, logprobs=logprobs,
                                finish_reason=output.finish_reason if output.finished else None)

    def _echo(self, job: Job, choice: int) -> str:
        """The prompt text choice `choice` continues with `echo`, else "" (choices are grouped by prompt)."""
        if not self.body.echo:
            return ""
        return job.prompt_of(choice).text

    def _shape_logprobs(self, index, ranked) -> CompletionLogprobs:
        result, self._offsets[index] = self._legacy(ranked, self._offsets.get(index, 0))
        return result

    def _legacy(self, ranked, offset: int) -> tuple[CompletionLogprobs, int]:
        """OpenAI's legacy logprobs of `ranked` tokens whose text starts at `offset`; the offset after them."""
        result = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for token_id, distribution, best in ranked:
            text = self.texts(token_id)[0]
            # OpenAI's legacy shape: the `top` most likely tokens and the sampled one (so up to top + 1)
            chosen = sorted({**dict(best), token_id: distribution[token_id]}.items(), key=lambda item: -item[1])
            result.tokens.append(text)
            result.token_logprobs.append(distribution[token_id])
            result.top_logprobs.append({self.texts(other)[0]: value for other, value in chosen})
            result.text_offset.append(offset)
            offset += len(text)
        return result, offset


def usage(job: Job, outputs: list[RequestOutput]) -> Usage:
    completion = sum(len(output.token_ids) for output in outputs)
    return Usage(prompt_tokens=job.prompt_tokens, completion_tokens=completion,
                 total_tokens=job.prompt_tokens + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=job.cached_tokens(outputs)))
