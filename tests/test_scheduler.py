"""Block manager and scheduler on fake sequences: budgets, chunked prefill, preemption."""
from __future__ import annotations

import pytest
import torch

from qwen2vl.engine.block_manager import BlockManager
from qwen2vl.engine.scheduler import SampledToken, Scheduler
from qwen2vl.engine.sequence import Sequence, SequenceStatus, find_stop_string, partial_stop_length
from qwen2vl.processor.types import PreparedPrompt
from qwen2vl.sampling_params import SamplingParams

PAD = 99


class _NoText:
    """A detokenizer of a tokenizer that has no text for any token."""

    text = ""

    def add(self, token_id: int) -> None:
        pass

    def flush(self) -> None:
        pass


def make_seq(name: str, prompt_len: int, vision_tokens: int = 0) -> Sequence:
    ids = [PAD] * vision_tokens + [1] * (prompt_len - vision_tokens)
    prompt = PreparedPrompt(input_ids=ids, positions=torch.zeros(3, prompt_len, dtype=torch.long), rope_delta=0,
                            vision_items=[object()] if vision_tokens else [])
    return Sequence(name, prompt, SamplingParams().resolve({}), vision_token_ids=[PAD], stop_token_ids=set(),
                    detokenizer=_NoText(), generator=None)


def run_step(scheduler: Scheduler) -> dict[str, int]:
    """Schedule, then the step's results: each sampling span gets token 2."""
    plan = scheduler.schedule()
    scheduler.update(plan, [SampledToken(2, None)] * len(plan.sampling))
    return {span.request_id: span.num_tokens for span in plan.spans}


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=32, vision=1000):
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=max_num_batched_tokens, max_vision_tokens_per_step=vision)


def test_block_manager_grows_with_tokens_and_frees_everything():
    manager = BlockManager(num_blocks=5, block_size=4)
    a, b = make_seq("a", 3), make_seq("b", 3)
    manager.grow(a, 4)
    assert len(a.block_table) == 1 and manager.num_free_blocks == 4
    manager.grow(a, 5)
    manager.grow(a, 8)
    assert len(a.block_table) == 2 and manager.num_free_blocks == 3
    assert manager.can_grow(b, 12) and not manager.can_grow(b, 13)
    manager.grow(b, 12)
    assert manager.num_free_blocks == 0 and not set(a.block_table) & set(b.block_table)
    with pytest.raises(RuntimeError, match="1 KV blocks needed, 0 free"):
        manager.grow(a, 9)
    manager.free(a)
    manager.free(b)
    assert manager.num_free_blocks == 5 and a.block_table == [] and b.block_table == []
    assert manager.blocks_for(0) == 0 and manager.blocks_for(1) == 1 and manager.blocks_for(9) == 3


def test_long_prompt_is_prefilled_in_chunks_and_samples_once():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    seq = make_seq("a", 50)
    scheduler.add(seq)
    steps = [run_step(scheduler) for _ in range(5)]
    assert steps == [{"a": 16}, {"a": 16}, {"a": 16}, {"a": 2}, {"a": 1}]
    assert seq.num_tokens == 52 and seq.num_computed_tokens == 51
    assert len(seq.block_table) == 13  # ceil(52 / 4): room for the token computed next


def test_decodes_run_first_and_new_prompts_fill_the_rest_of_the_budget():
    scheduler = make_scheduler(max_num_batched_tokens=10)
    for name in "ab":
        scheduler.add(make_seq(name, 4))
    assert run_step(scheduler) == {"a": 4, "b": 4}
    scheduler.add(make_seq("c", 20))
    assert run_step(scheduler) == {"a": 1, "b": 1, "c": 8}
    assert run_step(scheduler) == {"a": 1, "b": 1, "c": 8}
    scheduler.add(make_seq("d", 3))
    assert run_step(scheduler) == {"a": 1, "b": 1, "c": 4, "d": 3}
    assert run_step(scheduler) == {"a": 1, "b": 1, "c": 1, "d": 1}


def test_max_num_seqs_limits_running_sequences():
    scheduler = make_scheduler(max_num_seqs=2)
    for name in "abc":
        scheduler.add(make_seq(name, 3))
    assert run_step(scheduler) == {"a": 3, "b": 3}
    a = scheduler.running[0]
    a.finish("stop")
    scheduler.remove(a)
    assert run_step(scheduler) == {"b": 1, "c": 3}


def test_vision_encoder_budget_defers_second_image_request():
    scheduler = make_scheduler(vision=30)
    scheduler.add(make_seq("big", 40, vision_tokens=35))  # over the budget alone: still runs
    scheduler.add(make_seq("img", 10, vision_tokens=8))
    scheduler.add(make_seq("text", 5))
    assert run_step(scheduler) == {"big": 32}
    assert scheduler.waiting[0].request_id == "img"
    assert not scheduler.running[0].items_to_encode  # planned for encoding in step 1: no more encoder cost
    assert run_step(scheduler) == {"big": 8, "img": 10, "text": 5}


def test_preemption_frees_the_latest_sequence_and_recomputes_it_later():
    # 6 blocks of 4 tokens: two sequences of 8 prompt tokens grow to 3 blocks each; the 13th
    # token of either needs a 7th block.
    scheduler = make_scheduler(num_blocks=6, block_size=4)
    a, b = make_seq("a", 8), make_seq("b", 8)
    scheduler.add(a)
    scheduler.add(b)
    manager = scheduler.block_manager
    history = [run_step(scheduler) for _ in range(7)]
    assert history == [{"a": 8, "b": 8}] + [{"a": 1, "b": 1}] * 4 + [{"a": 1}] * 2
    assert scheduler.num_preemptions == 1 and b.num_preemptions == 1
    assert b.status is SequenceStatus.WAITING and list(scheduler.waiting) == [b] and b.block_table == []
    assert b.num_computed_tokens == 0 and b.num_tokens == 8 + 5  # keeps its 5 generated tokens
    a.finish("stop")
    scheduler.remove(a)
    assert run_step(scheduler) == {"b": 13}  # recomputes prompt and output, then samples
    assert b.num_tokens == 14 and b.num_computed_tokens == 13
    assert manager.num_free_blocks == 6 - 4
    b.finish("stop")
    scheduler.remove(b)
    assert manager.num_free_blocks == 6 and not scheduler.has_unfinished()


def test_preempted_sequence_can_preempt_itself_when_alone_it_cannot_grow():
    scheduler = make_scheduler(num_blocks=2, block_size=4)
    a, b = make_seq("a", 4), make_seq("b", 3)
    scheduler.add(a)
    scheduler.add(b)
    assert run_step(scheduler) == {"a": 4, "b": 3}  # a: 5 tokens, b: 4 tokens
    assert run_step(scheduler) == {"a": 1}  # a needs a second block: b is preempted
    assert scheduler.waiting[0] is b and scheduler.block_manager.num_free_blocks == 0


def test_stop_string_helpers():
    assert find_stop_string("hello world", 0, ["wor", "lo"]) == 3
    assert find_stop_string("hello world", 8, ["wor"]) == 6  # the match ends in the new text
    assert find_stop_string("hello world", 9, ["wor"]) is None  # it ended before: seen earlier
    assert find_stop_string("hello world", 10, ["hello"]) is None
    assert partial_stop_length("abc</", ["</stop>", "xyz"]) == 2
    assert partial_stop_length("abc", ["</stop>"]) == 0
    assert partial_stop_length("ab", ["abc", "b"]) == 2
