"""Shared fixtures: tiny random checkpoints, written once per session and variant."""
from __future__ import annotations

import os

import pytest

from checkpoints import write_tiny_checkpoint

# Loads in tests write no load cache entries (into the user's cache folder) unless a test asks.
os.environ.setdefault("QWEN2VL_LOAD_CACHE", "0")


@pytest.fixture(scope="session")
def tiny_ckpt_factory(tmp_path_factory):
    """`tiny_ckpt_factory(variant)` -> Path of a checkpoint directory, cached per variant."""
    cache = {}

    def make(variant: str = "a"):
        if variant not in cache:
            cache[variant] = write_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{variant}"), variant)
        return cache[variant]

    return make


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_ckpt_factory):
    return tiny_ckpt_factory("a")
