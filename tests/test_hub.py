import pytest

from qwen2vl.errors import CheckpointError
from qwen2vl import hub
from qwen2vl.hub import resolve_model_dir


def test_local_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_dir(tmp_path) == tmp_path


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve_model_dir(tmp_path)


def test_missing_path():
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        resolve_model_dir("./does/not/exist")


def test_hub_id_from_local_cache(tmp_path, monkeypatch):
    snapshot = tmp_path / "models--Qwen--Qwen2-VL-2B-Instruct-AWQ" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert resolve_model_dir("Qwen/Qwen2-VL-2B-Instruct-AWQ") == snapshot


def test_hub_id_offline_says_how_to_pass_a_local_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="pass its path"):
        resolve_model_dir("Qwen/Qwen2-VL-2B-Instruct-AWQ")


def test_no_model_given_prefers_the_cards_checkpoint_in_the_cache(tmp_path, monkeypatch):
    snapshot = tmp_path / "models--Qwen--Qwen2-VL-2B-Instruct-AWQ" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert resolve_model_dir() == snapshot


def test_no_model_given_falls_back_to_the_bundled_demo_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    demo = tmp_path / "demo"
    monkeypatch.setattr(hub, "DEMO_MODEL_DIR", demo)
    with pytest.raises(CheckpointError, match="no model given"):
        resolve_model_dir()
    demo.mkdir()
    (demo / "config.json").write_text("{}")
    assert resolve_model_dir() == demo


def test_the_bundled_demo_model_ships_with_the_source():
    assert (hub.DEMO_MODEL_DIR / "config.json").is_file()
    assert (hub.DEMO_MODEL_DIR / "model.safetensors").is_file()
