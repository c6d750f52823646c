"""`qwen2vl serve`: sampling flags as server-side defaults, the start-up lines, the open-host warning."""
from __future__ import annotations

import sys

import pytest

import qwen2vl.server
from qwen2vl import Qwen2VL
from qwen2vl.cli import main
from qwen2vl.sampling_params import SamplingParams


@pytest.fixture
def served(monkeypatch):
    """The keyword arguments `cmd_serve` passes to `serve`, which does not start a server here."""
    calls = []
    monkeypatch.setattr(qwen2vl.server, "serve", lambda llm, **options: calls.append(options))
    return calls


def test_sampling_flags_become_the_servers_defaults(tiny_ckpt, served, capsys):
    assert main(["serve", "--model", str(tiny_ckpt), "--temperature", "0", "--top-k", "5", "--max-tokens", "7",
                 "--stop", "END", "--seed", "3", "--served-model-name", "tiny", "--port", "8123"]) == 0
    options = served[0]
    assert options["default_params"] == SamplingParams(max_tokens=7, temperature=0.0, top_k=5, seed=3, stop=["END"])
    assert (options["model_name"], options["host"], options["port"]) == ("tiny", "127.0.0.1", 8123)
    err = capsys.readouterr().err
    assert f"[serving {tiny_ckpt} as model 'tiny' at http://127.0.0.1:8123/v1]" in err
    assert "warning" not in err


def test_every_server_limit_is_a_serve_option(tiny_ckpt, served):
    import dataclasses

    from qwen2vl.server.limits import ServerLimits, flag

    assert main(["serve", "--model", str(tiny_ckpt), "--max-video-pixels", "1000", "--max-choices", "3",
                 "--media-workers", "2", "--request-timeout", "5.5", "--max-prompt-tokens", "100"]) == 0
    assert served[-1]["limits"] == ServerLimits(max_video_pixels=1000, max_choices=3, media_workers=2,
                                                request_timeout_s=5.5, max_prompt_tokens=100)
    assert main(["serve", "--model", str(tiny_ckpt)]) == 0
    assert served[-1]["limits"] == ServerLimits()
    assert {flag(f) for f in dataclasses.fields(ServerLimits)} >= {"--max-video-pixels", "--max-choices",
                                                                    "--media-workers", "--request-timeout"}
    assert all(f.metadata.get("help") for f in dataclasses.fields(ServerLimits))  # each option says what it bounds


def test_a_bad_default_is_refused_before_loading(tiny_ckpt, served, capsys, monkeypatch):
    monkeypatch.setattr(Qwen2VL, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(["serve", "--model", str(tiny_ckpt), "--temperature", "-1"]) == 2
    assert capsys.readouterr().err.startswith("qwen2vl: error: sampling parameter temperature=-1.0 is invalid")
    assert served == []


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "myhost.example"])
def test_a_host_beyond_loopback_without_a_key_warns(tiny_ckpt, served, capsys, monkeypatch, host):
    monkeypatch.delenv("QWEN2VL_API_KEY", raising=False)
    assert main(["serve", "--model", str(tiny_ckpt), "--host", host]) == 0
    err = capsys.readouterr().err
    assert f"qwen2vl: warning: --host {host} accepts connections from other machines and no API key is set" in err
    url = f"http://[{host}]:8000/v1" if ":" in host else f"http://{host}:8000/v1"
    assert f"as model '{tiny_ckpt.name}' at {url}]" in err


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_or_a_key_does_not_warn(tiny_ckpt, served, capsys, monkeypatch, host):
    monkeypatch.delenv("QWEN2VL_API_KEY", raising=False)
    assert main(["serve", "--model", str(tiny_ckpt), "--host", host]) == 0
    assert "warning" not in capsys.readouterr().err
    monkeypatch.setenv("QWEN2VL_API_KEY", "secret")
    assert main(["serve", "--model", str(tiny_ckpt), "--host", "0.0.0.0"]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err and "API key required" in err
    assert served[-1]["api_key"] == "secret"


def test_several_api_keys_and_a_cache_salt_per_key(tiny_ckpt, served, monkeypatch):
    monkeypatch.delenv("QWEN2VL_API_KEY", raising=False)
    assert main(["serve", "--model", str(tiny_ckpt), "--api-key", "a", "b", "--api-key", "c", "--cache-salt-by-key"]) == 0
    assert served[-1]["api_key"] == ["a", "b", "c"] and served[-1]["cache_salt_by_key"] is True
    assert main(["serve", "--model", str(tiny_ckpt), "--api-key", "a"]) == 0
    assert served[-1]["api_key"] == ["a"] and served[-1]["cache_salt_by_key"] is False


def test_cache_salt_by_key_without_a_key_is_refused_before_loading(tiny_ckpt, served, capsys, monkeypatch):
    monkeypatch.delenv("QWEN2VL_API_KEY", raising=False)
    monkeypatch.setattr(Qwen2VL, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(["serve", "--model", str(tiny_ckpt), "--cache-salt-by-key"]) == 2
    assert capsys.readouterr().err == ("qwen2vl: error: --cache-salt-by-key gives each API key its own cache: give "
                                       "the keys (--api-key or $QWEN2VL_API_KEY)\n")
    assert served == []


def test_without_the_server_extra_serve_says_what_to_install(tiny_ckpt, capsys, monkeypatch):
    monkeypatch.delitem(sys.modules, "qwen2vl.server.app", raising=False)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    monkeypatch.setattr(Qwen2VL, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(["serve", "--model", str(tiny_ckpt)]) == 2
    assert capsys.readouterr().err == ("qwen2vl: error: serve needs the server extra (fastapi is not installed): "
                                       "pip install 'qwen2vl[server]', or from a clone pip install -e '.[server]'\n")


def test_requests_take_the_defaults_for_the_fields_they_leave_unset(tiny_ckpt, monkeypatch):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from qwen2vl.server import create_app

    llm = Qwen2VL.from_pretrained(tiny_ckpt, device="cpu", max_model_len=512)
    received = []
    add_request = llm.engine.add_request

    def recording(prompt, params, *args, **kwargs):
        received.append(params)
        return add_request(prompt, params, *args, **kwargs)

    monkeypatch.setattr(llm.engine, "add_request", recording)
    hello = [{"role": "user", "content": "Hello there"}]
    defaults = SamplingParams(temperature=0, top_p=0.5, max_tokens=6, seed=11, stop=["END"], ignore_eos=True)
    app = create_app(llm, model_name="tiny", default_params=defaults)
    with TestClient(app) as client:
        def chat(**fields):
            reply = client.post("/v1/chat/completions", json={"messages": hello, **fields})
            assert reply.status_code == 200, reply.text
            return reply.json()

        unset = chat()
        assert (received[-1].temperature, received[-1].top_p, received[-1].max_tokens, received[-1].seed,
                received[-1].stop) == (0, 0.5, 6, 11, ["END"])
        assert received[-1].top_k is None  # neither the client nor the server set it: generation_config's
        assert unset["usage"]["completion_tokens"] == 6
        greedy = llm.chat(hello, temperature=0, top_p=0.5, max_tokens=6, ignore_eos=True)
        assert unset["choices"][0]["message"]["content"] == greedy.text
        chat(temperature=1.5, top_p=1, seed=4, stop=None, max_tokens=3)  # what the client sets wins
        assert (received[-1].temperature, received[-1].top_p, received[-1].seed, received[-1].stop,
                received[-1].max_tokens) == (1.5, 1, 4, None, 3)
        assert chat(max_completion_tokens=4)["usage"]["completion_tokens"] == 4
        assert [params.seed for params in received[-2:]] == [4, 11]
        two = chat(n=2)  # choice i samples with the default seed + i, as with a client's seed
        assert [params.seed for params in received[-2:]] == [11, 12] and len(two["choices"]) == 2
        completion = client.post("/v1/completions", json={"prompt": "The quick brown fox"})
        assert completion.status_code == 200, completion.text
        assert completion.json()["usage"]["completion_tokens"] == 6  # the server's default, not OpenAI's 16


def test_the_connection_flags_reach_uvicorn(tiny_ckpt, monkeypatch):
    uvicorn = pytest.importorskip("uvicorn")
    from qwen2vl.server import connections

    runs, lifted = [], []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: runs.append((app, options)))
    monkeypatch.setattr(connections, "raise_open_file_limit", lifted.append)
    assert main(["serve", "--model", str(tiny_ckpt), "--header-timeout", "3", "--body-timeout", "4",
                 "--max-connections", "7", "--docs"]) == 0
    (app, options), = runs
    limits = app.state.server.limits
    assert (limits.header_timeout_s, limits.body_timeout_s, limits.max_connections) == (3.0, 4.0, 7)
    assert options["http"].header_timeout_s == 3.0 and options["limit_concurrency"] == 8
    assert lifted == [7]
    assert "/docs" in {route.path for route in app.routes}


@pytest.mark.parametrize("soft, hard, expected", [(1024, 4096, 1256), (1024, 1100, 1100), (4096, 4096, None)])
def test_the_open_file_limit_is_lifted_to_fit_the_connections(monkeypatch, caplog, soft, hard, expected):
    resource = pytest.importorskip("resource")
    pytest.importorskip("uvicorn")
    from qwen2vl.server.connections import raise_open_file_limit

    set_to = []
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (soft, hard))
    monkeypatch.setattr(resource, "setrlimit", lambda kind, limits: set_to.append(limits))
    raise_open_file_limit(1000)
    assert set_to == ([] if expected is None else [(expected, hard)])
    assert ("needs about 1256 open files, but the limit is 1100" in caplog.text) == (expected == 1100)
