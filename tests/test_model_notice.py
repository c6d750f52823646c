"""Which model answers: every entry point names the checkpoint it loads, the bundled demo model
is a warning saying how to pick another, `qwen2vl --version`, the id a directory is served under."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

import qwen2vl
import qwen2vl.server
from qwen2vl import Qwen2VL, hub
from qwen2vl.cli import main
from qwen2vl.errors import CheckpointError

GREEDY = ["--temperature", "0", "--max-tokens", "2"]
CARD = "Qwen/Qwen2-VL-2B-Instruct-AWQ"


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """No checkpoint in the Hugging Face cache: no model given means the bundled demo model."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def cached_card(hub_cache):
    snapshot = hub_cache / f"models--{CARD.replace('/', '--')}" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    return snapshot


def test_the_notice_names_a_directory_a_hub_id_and_the_default(tmp_path, empty_hub_cache):
    model = tmp_path / "my-model"
    model.mkdir()
    assert hub.model_notice(str(model), model) == (logging.INFO, f"loading {model}")
    snapshot = cached_card(empty_hub_cache)
    assert hub.model_notice(CARD, snapshot) == (logging.INFO, f"loading {CARD} ({snapshot})")
    assert hub.model_notice(None, snapshot) == (
        logging.INFO, f"no model given: loading {CARD} ({snapshot}); --model picks another")
    assert hub.model_notice(CARD, None) == (logging.INFO, f"loading {CARD}")  # not looked up here (Ray)


def test_the_demo_model_is_a_warning_that_says_how_to_pick_another():
    level, text = hub.model_notice(None, hub.DEMO_MODEL_DIR)
    assert level == logging.WARNING
    assert text == (f"no model given: loading the bundled demo model qwen2-vl-shapes-demo ({hub.DEMO_MODEL_DIR}), "
                    "a tiny model trained only on synthetic shapes that cannot describe real images; pick a real "
                    f"one with --model {CARD} or --model DIR (Python: Qwen2VL.from_pretrained('{CARD}'))")
    # named explicitly, it is what the user asked for: no warning
    assert hub.model_notice(str(hub.DEMO_MODEL_DIR), hub.DEMO_MODEL_DIR) == (logging.INFO,
                                                                             f"loading {hub.DEMO_MODEL_DIR}")


def test_model_id_is_short(tmp_path, empty_hub_cache, monkeypatch):
    model = tmp_path / "my-model"
    model.mkdir()
    assert hub.model_id(str(model), model) == "my-model"
    monkeypatch.chdir(model)
    assert hub.model_id(".", model) == "my-model"
    snapshot = cached_card(empty_hub_cache)
    assert hub.model_id(str(snapshot), snapshot) == CARD  # a snapshot folder's name is a commit hash
    assert hub.model_id(CARD, snapshot) == CARD
    assert hub.model_id(None, snapshot) == CARD
    assert hub.model_id(None, hub.DEMO_MODEL_DIR) == "qwen2-vl-shapes-demo"


def test_from_pretrained_logs_the_model_before_loading_it(tiny_ckpt, caplog, monkeypatch):
    import qwen2vl.loader

    def refuse(*args, **kwargs):
        raise CheckpointError("stop here")

    monkeypatch.setattr(qwen2vl.loader, "load_model", refuse)
    with caplog.at_level(logging.INFO, logger="qwen2vl"), pytest.raises(CheckpointError, match="stop here"):
        Qwen2VL.from_pretrained(tiny_ckpt)
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("qwen2vl", logging.INFO, f"loading {tiny_ckpt}")]


def test_a_library_user_sees_the_demo_warning_without_configuring_logging(tmp_path):
    """No logging set up: Python's last-resort handler prints warnings, so the fallback shows."""
    code = ("from qwen2vl.hub import announce_model, DEMO_MODEL_DIR; "
            "announce_model('some/dir', DEMO_MODEL_DIR); announce_model(None, DEMO_MODEL_DIR)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "HF_HUB_CACHE": str(tmp_path)})
    assert out.stderr.startswith("no model given: loading the bundled demo model qwen2-vl-shapes-demo")
    assert "loading some/dir" not in out.stderr and out.stderr.count("\n") == 1  # INFO stays quiet


def test_chat_without_model_warns_on_stderr_that_the_demo_model_answers(empty_hub_cache, capsys):
    assert main(["chat", *GREEDY, "Hello"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("qwen2vl: warning: no model given: loading the bundled demo model qwen2-vl-shapes-demo (")
    assert f"pick a real one with --model {CARD}" in err.splitlines()[0]
    assert out.strip()  # and it answers


def test_chat_one_shot_and_interactive_name_the_model(tiny_ckpt, capsys, monkeypatch):
    assert main(["chat", "--model", str(tiny_ckpt), *GREEDY, "Describe."]) == 0
    assert capsys.readouterr().err == f"qwen2vl: loading {tiny_ckpt}\n"
    lines = iter(["Hi", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(tiny_ckpt), *GREEDY]) == 0
    assert capsys.readouterr().err.startswith(f"qwen2vl: loading {tiny_ckpt}\nType a message;")


def test_generate_and_eval_name_the_model(tiny_ckpt, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    assert main(["generate", "--model", str(tiny_ckpt), "--input", str(source), *GREEDY]) == 0
    assert capsys.readouterr().err.startswith(f"qwen2vl: loading {tiny_ckpt}\n")
    assert main(["eval", str(tiny_ckpt), "--n", "1", "--only", "color"]) == 0
    assert capsys.readouterr().err.startswith(f"qwen2vl: loading {tiny_ckpt}\n")


def test_generate_with_ray_names_the_model_before_the_replicas_start(empty_hub_cache, caplog):
    from qwen2vl.cli import _announce_replicas_model

    with caplog.at_level(logging.INFO, logger="qwen2vl"):
        _announce_replicas_model("s3://bucket/model")  # the cluster's: not looked up here
        _announce_replicas_model(None)
    assert [r.getMessage() for r in caplog.records][0] == "loading s3://bucket/model"
    assert caplog.records[1].levelno == logging.WARNING and "bundled demo model" in caplog.records[1].getMessage()


@pytest.fixture
def served(monkeypatch):
    calls = []
    monkeypatch.setattr(qwen2vl.server, "serve", lambda llm, **options: calls.append(options))
    return calls


def test_serve_says_loading_before_the_load_and_serves_a_directory_by_its_folder_name(tiny_ckpt, served, capsys,
                                                                                     monkeypatch):
    assert main(["serve", "--model", str(tiny_ckpt)]) == 0
    assert served[-1]["model_name"] == tiny_ckpt.name
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"qwen2vl: loading {tiny_ckpt}"
    assert err[-1] == f"[serving {tiny_ckpt} as model '{tiny_ckpt.name}' at http://127.0.0.1:8000/v1]"
    assert main(["serve", "--model", str(tiny_ckpt), "--served-model-name", "mine"]) == 0
    assert served[-1]["model_name"] == "mine"
    capsys.readouterr()

    import qwen2vl.loader

    def stuck(*args, **kwargs):  # the load, seen from the terminal: the line is already there
        assert capsys.readouterr().err == f"qwen2vl: loading {tiny_ckpt}\n"
        raise CheckpointError("stopped")

    monkeypatch.setattr(qwen2vl.loader, "load_model", stuck)
    assert main(["serve", "--model", str(tiny_ckpt)]) == 2
    assert capsys.readouterr().err == "qwen2vl: error: stopped\n"


def test_serve_without_model_serves_the_demo_under_its_folder_name(empty_hub_cache, served, capsys):
    assert main(["serve"]) == 0
    assert served[-1]["model_name"] == "qwen2-vl-shapes-demo"
    assert capsys.readouterr().err.startswith("qwen2vl: warning: no model given: loading the bundled demo model")


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"qwen2vl {qwen2vl.__version__}\n"
    from importlib.metadata import version

    assert qwen2vl.__version__ == version("qwen2vl")


def test_eval_n_counts_all_samples_dealt_to_the_prompt_types(tiny_ckpt, tmp_path, capsys):
    from qwen2vl.evals.shapes import TASKS

    out = tmp_path / "scores.json"
    assert main(["eval", str(tiny_ckpt), "--n", "9", "--json", str(out)]) == 0
    totals = {task: counts["total"] for task, counts in json.loads(out.read_text()).items()}
    assert totals == dict(zip(TASKS, [2, 2, 1, 1, 1, 1, 1]))
    assert "[9 samples in" in capsys.readouterr().err


def test_eval_n_below_one_is_refused(tiny_ckpt, capsys):
    assert main(["eval", str(tiny_ckpt), "--n", "0"]) == 2
    assert capsys.readouterr().err == "qwen2vl: error: --n 0: expected an integer >= 1\n"


def test_the_offline_hint_names_the_installed_hub_command(empty_hub_cache, monkeypatch):
    with pytest.raises(CheckpointError, match=f"`hf download {CARD} --local-dir DIR`"):
        hub.resolve_model_dir(CARD)

    class Distribution:
        def __init__(self, *names):
            self.entry_points = [type("EntryPoint", (), {"name": name})() for name in names]

    from importlib import metadata

    monkeypatch.setattr(metadata, "distribution", lambda name: Distribution("huggingface-cli"))
    assert hub.hub_cli() == "huggingface-cli"  # huggingface_hub before 0.34
    monkeypatch.setattr(metadata, "distribution", lambda name: Distribution("hf", "huggingface-cli"))
    assert hub.hub_cli() == "hf"
