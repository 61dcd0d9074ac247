"""melbo serve: the real openai client against a server started here (loopback, a free port), bad requests, batching,
a bounded load test, the explorer page in Chromium, and the shell's one-line errors."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from helpers import assert_one_line_error, melbo

from melbo.files.runs import write_run
from melbo.model.forward import generate_steered
from melbo.model.loading import load_model
from melbo.model.prompts import PromptFormat, encode_prompt
from melbo.serve import server_config
from melbo.serve.api import ServeLimits, create_app
from melbo.serve.batching import Batcher
from melbo.serve.catalog import Catalog

uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

PROMPT = "How can I do it?"
LAYER = 1


def make_run(folder: Path, model: str, count: int = 6, seed: int = 0, d: int = 32, completions: list[str] | None = None,
             chat_template: bool = True, system: str | None = None) -> Path:
    vectors = torch.randn(count, d, generator=torch.Generator().manual_seed(seed))
    vectors = 3 * vectors / vectors.norm(dim=1, keepdim=True)
    texts = completions or [f"answer {i}" for i in range(count)]
    meta = {
        "kind": "discover", "model": {"name": model}, "model_identity": {"path": model, "d_model": d},
        "layers": {"source": LAYER, "target": 4}, "prompts": [PROMPT], "prompt_format": {"system": system, "chat_template": chat_template},
        "vectors": [{"index": i, "completion": texts[i]} for i in range(count)],
    }
    write_run(folder, vectors, meta)
    return folder


class Server:
    """uvicorn in a thread on 127.0.0.1 and a free port; stopped by ``close`` (also when a test fails)."""

    def __init__(self, app) -> None:
        # melbo serve's own uvicorn settings (its default keep-alive); log_config=None: uvicorn's loggers propagate to
        # the root one, so a test sees every error it logs
        config = server_config(app, "127.0.0.1", 0, ServeLimits(), lifespan="on", log_config=None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started, "the server did not start"
        sockets = [s for server in self.server.servers for s in server.sockets]
        host, port = sockets[0].getsockname()[:2]
        assert host == "127.0.0.1"
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def served(tiny_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    run = make_run(root / "tinyrun", str(tiny_folder))
    lm = load_model(str(tiny_folder), device="cpu")
    catalog = Catalog([run])
    server = Server(create_app(lm, catalog, ServeLimits(max_tokens=32, max_prompt_tokens=200, max_body_bytes=4096, max_queue=8, max_batch=8)))
    try:
        # the tests' own copy of the model: the server's batcher steers its model with hooks for as long as a batch
        # runs, and a reply can reach a test before they are removed, so a reference computed on the server's model in
        # that instant would be steered twice (one CI run's failure)
        yield server, load_model(str(tiny_folder), device="cpu"), catalog
    finally:
        server.close()


def expected(lm, catalog, index: int | None, tokens: int, scale: float = 1.0) -> str:
    ids = encode_prompt(lm.tokenizer, PROMPT, PromptFormat(), lm.device)
    vector = None if index is None else catalog.runs["tinyrun"].run.vectors[index : index + 1] * scale
    return generate_steered(lm.model, lm.tokenizer, ids, vector, LAYER, max_new_tokens=tokens)[0]


def test_openai_client_steered_and_unsteered_streaming_and_not(served):
    server, lm, catalog = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [catalog.model_name]
    messages = [{"role": "user", "content": PROMPT}]
    for index in (None, 2, 5):
        extra = {} if index is None else {"extra_body": {"melbo": {"run": "tinyrun", "vector": index, "scale": 1.0}}}
        reply = client.chat.completions.create(model=catalog.model_name, messages=messages, temperature=0, max_tokens=12, **extra)
        assert reply.choices[0].message.content == expected(lm, catalog, index, 12), index
        assert reply.choices[0].finish_reason in ("stop", "length")
        chunks = client.chat.completions.create(model=catalog.model_name, messages=messages, temperature=0, max_tokens=12, stream=True, **extra)
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert text == expected(lm, catalog, index, 12), index
    scaled = client.chat.completions.create(
        model=catalog.model_name, messages=messages, temperature=0, max_tokens=12, extra_body={"melbo": {"run": "tinyrun", "vector": 1, "scale": 2.0}},
    )
    assert scaled.choices[0].message.content == expected(lm, catalog, 1, 12, scale=2.0)
    completion = client.completions.create(model=catalog.model_name, prompt="Once upon", temperature=0, max_tokens=8)
    ids = lm.tokenizer("Once upon", return_tensors="pt").input_ids
    assert completion.choices[0].text == generate_steered(lm.model, lm.tokenizer, ids, None, LAYER, max_new_tokens=8)[0]


def test_idle_connections_stay_open_longer_than_clients_keep_them(served):
    """A server that closes an idle connection when a client's pool expires it (uvicorn's 5 s, httpx's and the openai
    client's 5 s) races the client reusing it: a ReadError under load. melbo serve keeps them open longer."""
    from openai._constants import DEFAULT_CONNECTION_LIMITS

    server, _, _ = served
    pools = [httpx.Limits().keepalive_expiry, DEFAULT_CONNECTION_LIMITS.keepalive_expiry]
    assert server.server.config.timeout_keep_alive > max(p or 0 for p in pools) > 0


def test_runs_are_listed_with_norms_and_labels(served):
    server, _, catalog = served
    body = httpx.get(server.url + "/v1/runs").json()
    (run,) = body["data"]
    assert run["name"] == "tinyrun" and run["layer"] == LAYER and run["count"] == 6
    assert [v["norm"] for v in run["vectors"]] == pytest.approx([3.0] * 6, rel=1e-4)
    assert run["vectors"][0]["label"] == "other"


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "is not served here"),
        ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
        ({"model": "M", "messages": []}, 400, "messages"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "melbo": {"run": "other", "vector": 0}}, 404, "run 'other' is not served"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "melbo": {"run": "tinyrun", "vector": 6}}, 404, "vectors 0 to 5"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "melbo": {"run": "tinyrun", "vector": 0, "scale": "Infinity"}}, 400, "finite"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "melbo": {"run": "tinyrun", "vector": 0, "scal": 1}}, 400, "scal"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 999}, 400, "over this server's limit of 32"),
        ({"model": "M", "messages": [{"role": "user", "content": "x" * 300}]}, 400, "limit is 200"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n must be 1"),
    ],
)
def test_bad_requests_get_a_4xx_json_error(served, body, status, needle):
    server, _, catalog = served
    body = json.loads(json.dumps(body).replace('"M"', json.dumps(catalog.model_name)))
    answer = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert answer.status_code == status, answer.text
    assert needle in answer.json()["error"]["message"]


def test_unknown_paths_and_methods_get_the_same_json_error(served):
    """Not FastAPI's {"detail": "Not Found"}: every 4xx has the OpenAI error shape the API's clients read."""
    server, _, _ = served
    for answer, status in ((httpx.get(server.url + "/v1/nothing"), 404), (httpx.get(server.url + "/v1/chat/completions"), 405)):
        assert answer.status_code == status and answer.json()["error"]["code"] == status, answer.text
        assert answer.json()["error"]["message"] and "detail" not in answer.json()


def test_a_runs_report_is_served_with_a_link_to_its_vectors_live(served):
    server, _, catalog = served
    assert httpx.get(f"{server.url}/runs/tinyrun/report").status_code == 404  # no report.html yet: a JSON 404
    assert httpx.get(f"{server.url}/v1/runs").json()["data"][0]["report"] is False
    page = catalog.runs["tinyrun"].run.path / "report.html"
    page.write_text("<html><body><h1>the report</h1></body></html>", encoding="utf-8")
    try:
        answer = httpx.get(f"{server.url}/runs/tinyrun/report")
        assert answer.status_code == 200 and "<h1>the report</h1>" in answer.text
        assert 'href="/?run=tinyrun"' in answer.text
        assert httpx.get(f"{server.url}/v1/runs").json()["data"][0]["report"] is True
        missing = httpx.get(f"{server.url}/runs/nope/report")
        assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]
    finally:
        page.unlink()


def test_malformed_and_oversized_bodies(served):
    server, _, _ = served
    answer = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and "error" in answer.json()
    answer = httpx.post(server.url + "/v1/chat/completions", content=b"x" * 5000, headers={"Content-Type": "application/json"})
    assert answer.status_code == 413 and "over 4096 bytes" in answer.json()["error"]["message"]

    def chunked():
        for _ in range(10):
            yield b"y" * 1000

    answer = httpx.post(server.url + "/v1/chat/completions", content=chunked(), headers={"Content-Type": "application/json"})
    assert answer.status_code == 413
    assert httpx.get(server.url + "/v1/models").status_code == 200  # still serving


def test_concurrent_requests_share_batches(tiny_folder, tmp_path):
    run = make_run(tmp_path / "tinyrun", str(tiny_folder))
    lm = load_model(str(tiny_folder), device="cpu")
    catalog = Catalog([run])
    truth = [expected(lm, catalog, index, 10) for index in range(6)]  # before the server owns the model
    limits = ServeLimits(max_batch=8, window=0.2, max_tokens=32)
    batcher = Batcher.from_limits(lm, limits)
    server = Server(create_app(lm, catalog, limits, batcher))
    try:
        async def ask(client, index):
            body = {"model": catalog.model_name, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": 10,
                    "melbo": {"run": "tinyrun", "vector": index}}
            return (await client.post(server.url + "/v1/chat/completions", json=body, timeout=60)).json()

        async def all_at_once():
            async with httpx.AsyncClient() as client:
                return await asyncio.gather(*(ask(client, i) for i in range(6)))

        replies = asyncio.run(all_at_once())
        assert batcher.largest_batch >= 4 and batcher.batches <= 3  # the six shared one or two forward loops
        for index, reply in enumerate(replies):  # same prompt, no padding: each row decodes as it would alone
            assert reply["choices"][0]["message"]["content"] == truth[index]
    finally:
        server.close()


def test_load_64_clients_mixing_good_bad_and_dropped_requests(tiny_folder, tmp_path, caplog):
    run = make_run(tmp_path / "tinyrun", str(tiny_folder))
    lm = load_model(str(tiny_folder), device="cpu")
    catalog = Catalog([run])
    truth = {i: expected(lm, catalog, i, 6) for i in range(6)}  # before the server owns the model
    limits = ServeLimits(max_batch=16, window=0.01, max_tokens=16, max_queue=512)
    batcher = Batcher.from_limits(lm, limits)
    server = Server(create_app(lm, catalog, limits, batcher))
    process = psutil.Process(os.getpid())

    async def client_session(number: int, client: httpx.AsyncClient) -> list[str]:
        outcomes = []
        for k in range(5):
            kind = (number + k) % 4
            index = (number * 5 + k) % 6
            good = {"model": catalog.model_name, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": 6,
                    "melbo": {"run": "tinyrun", "vector": index}}
            if kind == 0:  # a good request
                answer = await client.post(server.url + "/v1/chat/completions", json=good, timeout=120)
                assert answer.status_code == 200, answer.text
                assert answer.json()["choices"][0]["message"]["content"] == truth[index]
                outcomes.append("good")
            elif kind == 1:  # a bad one
                answer = await client.post(server.url + "/v1/chat/completions", json={**good, "melbo": {"run": "tinyrun", "vector": 99}}, timeout=120)
                assert answer.status_code == 404 and "vectors 0 to 5" in answer.json()["error"]["message"]
                outcomes.append("bad")
            elif kind == 2:  # a stream dropped after its first event
                async with client.stream("POST", server.url + "/v1/chat/completions", json={**good, "stream": True, "max_tokens": 16}, timeout=120) as answer:
                    async for _ in answer.aiter_bytes():
                        break
                outcomes.append("dropped")
            else:  # a good stream read to the end
                async with client.stream("POST", server.url + "/v1/chat/completions", json={**good, "stream": True}, timeout=120) as answer:
                    text = ""
                    async for line in answer.aiter_lines():
                        if line.startswith("data: {"):
                            text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                assert text == truth[index]
                outcomes.append("streamed")
        return outcomes

    async def load() -> list[list[str]]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(limits=limits) as client:
            return await asyncio.gather(*(client_session(n, client) for n in range(64)))

    try:
        asyncio.run(load())  # warm-up round: allocator pools, tokenizer caches
        gc.collect()
        before = process.memory_info().rss
        started = time.monotonic()
        outcomes = asyncio.run(load())
        assert time.monotonic() - started < 300
        gc.collect()
        grown = process.memory_info().rss - before
        flat = [o for session in outcomes for o in session]
        assert len(flat) == 320 and {o: flat.count(o) for o in set(flat)} == {"good": 80, "bad": 80, "dropped": 80, "streamed": 80}
        assert grown < 64 * 2**20, f"memory grew by {grown / 2**20:.0f} MiB over 320 requests"
        assert httpx.get(server.url + "/v1/models").status_code == 200
        deadline = time.monotonic() + 10  # the worker may still be taking the last dropped request off the queue
        while batcher.queue.qsize() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert batcher.queue.qsize() == 0
    finally:
        server.close()
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], [r.getMessage() for r in caplog.records]


def test_each_answered_request_is_one_line_in_the_access_log(tiny_folder, tmp_path):
    """Under nohup a server's log must show what it did: a line per request, with its status, steering and token
    counts, an error's message, a client that left; never the prompt or the completion."""
    run = make_run(tmp_path / "tinyrun", str(tiny_folder))
    lm = load_model(str(tiny_folder), device="cpu")
    catalog = Catalog([run])
    lines: list[str] = []
    app = create_app(lm, catalog, ServeLimits(max_tokens=32), access_log=lines.append)
    server = Server(app)
    chat = {"model": catalog.model_name, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": 7}
    try:
        assert httpx.get(server.url + "/v1/runs", timeout=30).status_code == 200
        steered = httpx.post(server.url + "/v1/chat/completions", json={**chat, "melbo": {"run": "tinyrun", "vector": 1, "scale": 2.0}}, timeout=60)
        assert steered.status_code == 200
        with httpx.stream("POST", server.url + "/v1/completions", json={"model": catalog.model_name, "prompt": "Once upon", "max_tokens": 5, "temperature": 0, "stream": True}, timeout=60) as answer:
            assert "[DONE]" in "".join(answer.iter_text())
        bad = httpx.post(server.url + "/v1/chat/completions", json={**chat, "melbo": {"run": "tinyrun", "vector": 99}}, timeout=60)
        assert bad.status_code == 404
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={**chat, "max_tokens": 32, "stream": True}, timeout=60) as answer:
            next(answer.iter_bytes())  # the client leaves after the first event
        deadline = time.monotonic() + 30
        while len(lines) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.close()
    assert len(lines) == 5, lines
    runs, steered_line, streamed, refused, left = lines
    assert runs.startswith("GET /v1/runs 200 in ")
    generated = len(lm.tokenizer(steered.json()["choices"][0]["message"]["content"], add_special_tokens=False).input_ids)
    assert steered_line.startswith("POST /v1/chat/completions 200 in ") and "run tinyrun vector 1 ×2, prompt " in steered_line
    assert f"{generated} generated (" in steered_line and "s queued" in steered_line and "streamed" not in steered_line
    assert streamed.startswith("POST /v1/completions 200 in ") and "unsteered, prompt " in streamed and streamed.endswith(", streamed")
    assert refused.startswith("POST /v1/chat/completions 404 in ") and "vectors 0 to 5" in refused
    assert left.startswith("POST /v1/chat/completions client left in ")
    assert not any(text in line for line in lines for text in (PROMPT, "Once upon"))
    assert (app.answered, app.errors) == (5, 1)


def test_queue_full_is_429(tiny_folder, tmp_path):
    run = make_run(tmp_path / "tinyrun", str(tiny_folder))
    lm = load_model(str(tiny_folder), device="cpu")
    catalog = Catalog([run])
    app = create_app(lm, catalog, ServeLimits(max_queue=1, max_batch=1, window=0.0, max_tokens=32))
    server = Server(app)
    try:
        body = {"model": catalog.model_name, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 32, "temperature": 0}

        async def burst():
            async with httpx.AsyncClient() as client:
                return await asyncio.gather(*(client.post(server.url + "/v1/chat/completions", json=body, timeout=120) for _ in range(12)))

        codes = [r.status_code for r in asyncio.run(burst())]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).status_code == 200
    finally:
        server.close()


def test_shell_refuses_runs_of_different_models_and_missing_runs(tiny_folder, tmp_path):
    make_run(tmp_path / "a", str(tiny_folder))
    make_run(tmp_path / "b", "smollm2", d=576)
    for args, needle in (([tmp_path / "a", tmp_path / "b"], "different models"), ([tmp_path / "missing"], "does not exist")):
        result = melbo("serve", *map(str, args))
        assert_one_line_error(result, needle)
        assert "run(s) on http" not in result.stdout  # no "serving" line for a server that never started


def test_a_folder_of_runs_serves_each_run_in_it(tiny_folder, tmp_path):
    """`melbo serve melbo-runs/demo-…` (a demo's or a study's folder: no run.json of its own) serves its runs, named by
    their paths in it; a run given itself keeps its folder's name. It used to stop at "has no run.json"."""
    from melbo.files.runs import runs_in

    study = tmp_path / "study"
    for part in ("discover", "ortho", "R=20/ortho"):
        make_run(study / part, str(tiny_folder), seed=len(part))
    (study / "plots").mkdir()  # folders without a run are passed over
    assert runs_in(study) == [study / "R=20" / "ortho", study / "discover", study / "ortho"] and runs_in(study / "ortho") == []
    catalog = Catalog([study, make_run(tmp_path / "alone", str(tiny_folder))])
    assert sorted(catalog.runs) == ["R=20/ortho", "alone", "discover", "ortho"]
    assert_one_line_error(melbo("serve", str(tmp_path / "study" / "plots")), "has no run.json")  # a folder of no runs


def test_a_port_in_use_is_one_line_before_the_model_loads(tiny_folder, tmp_path):
    """Not uvicorn's "address already in use" with exit 3 after the load and a "serving" line that was not true."""
    import socket

    run = make_run(tmp_path / "a", str(tiny_folder))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = melbo("serve", str(run), "--port", str(port), "--model", str(tmp_path / "no-such-model"))
    assert_one_line_error(result, f"127.0.0.1:{port} is in use (another server?): choose another --port")
    assert "run(s) on http" not in result.stdout


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_melbo_serve_from_the_shell_answers_and_stops(tiny_folder, tmp_path, stop):
    """Ctrl-C, or a scheduler's SIGTERM: uvicorn shuts down gracefully, and the log says how it ended."""
    import signal
    import socket
    import subprocess
    import sys

    run = make_run(tmp_path / "shellrun", str(tiny_folder))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "melbo.cli", "serve", str(run), "--port", str(port), "--device", "cpu"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # as from a terminal: a suite started in the background by a non-interactive shell (as CI may be) passes SIGINT
        # on ignored, and a server that ignores it at start stops on uvicorn's handler with exit status 0
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        answer = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/v1/runs", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.3)
        assert answer is not None and answer.status_code == 200, proc.stderr.read() if proc.poll() is not None else "no answer"
        assert answer.json()["data"][0]["name"] == "shellrun"
        listening = {c.laddr.ip for c in psutil.Process(proc.pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        assert listening == {"127.0.0.1"}
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
        assert httpx.get(f"http://127.0.0.1:{port}/v1/nothing", timeout=5).status_code == 404
    finally:
        proc.send_signal(getattr(signal, stop))
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == {"SIGINT": 130, "SIGTERM": 143}[stop], err
    assert "Traceback" not in err
    # its log (stderr is a pipe here, as under nohup): a timestamped line per request, and how it ended
    assert re.search(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] GET /v1/runs 200 in \d+\.\d s$", err, re.M), err
    assert re.search(r"\] GET /v1/nothing 404 in \d+\.\d s: Not Found$", err, re.M), err
    how = {"SIGINT": "Ctrl-C", "SIGTERM": "SIGTERM"}[stop]
    assert out.splitlines()[-1] == f"melbo serve: stopped by {how} after 3 request(s), 1 answered with an error", out


def test_batched_decoding_uses_the_cache_api(tiny_folder):
    """transformers deprecates passing `past_key_values` (removed in 5.40): the decoder hands in its own Cache object
    under the name the model's forward takes, and the greedy text is unchanged."""
    from melbo.serve.batching import Batcher, Request

    lm = load_model(str(tiny_folder), device="cpu")
    ids = encode_prompt(lm.tokenizer, PROMPT, PromptFormat(), lm.device)
    passed: list[set[str]] = []
    handle = lm.model.register_forward_pre_hook(lambda module, args, kwargs: passed.append(set(kwargs)), with_kwargs=True)
    batcher = Batcher(lm, max_batch=2, window=0.2)
    batcher.eos = set()  # every row runs to its max_tokens (this tiny model would end at once)
    pieces: dict[int, list[str]] = {0: [], 1: []}
    done: list[int] = []
    finished = threading.Event()

    def emitter(k):
        def emit(piece, reason):
            pieces[k].append(piece)
            if reason:
                done.append(k)
                if len(done) == 2:
                    finished.set()
        return emit

    try:
        for k, tokens in ((0, 5), (1, 9)):  # different lengths: the shorter row leaves the cache mid-way
            batcher.submit(Request(prompt_ids=ids[0].tolist(), emit=emitter(k), max_tokens=tokens))
        assert finished.wait(60)
    finally:
        batcher.close()
        handle.remove()
    assert len(passed) >= 9 and all("past_key_values" not in kw and "cache" in kw for kw in passed), passed
    with torch.no_grad():  # greedy without any cache, one full forward per token
        out = ids
        for _ in range(9):
            out = torch.cat([out, lm.model(input_ids=out).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    for k, tokens in ((0, 5), (1, 9)):
        assert "".join(pieces[k]) == lm.tokenizer.decode(out[0, ids.shape[1] : ids.shape[1] + tokens], skip_special_tokens=True)


def test_a_base_model_without_a_chat_template_is_served_raw_and_chat_is_a_400(tiny_folder, tmp_path):
    """Gemma 3 270M (a base model: no chat template) behind `melbo serve`: /v1/chat/completions was a bare "Internal
    Server Error" (transformers' ValueError), and the explorer, which only asked that way, showed it in every column.
    Now chat is a 400 in OpenAI's shape that names /v1/completions, the server goes on, and /v1/runs says each run's
    prompt format so the explorer asks as the run was made."""
    run = make_run(tmp_path / "raw", str(tiny_folder), chat_template=False)
    lm = load_model(str(tiny_folder), device="cpu")
    lm.tokenizer.chat_template = None  # as a base model's GGUF has none
    server = Server(create_app(lm, Catalog([run]), ServeLimits(max_tokens=32)))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=4)
        assert refused.value.status_code == 400 and "no chat template" in refused.value.message and "/v1/completions" in refused.value.message
        reply = client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=6, extra_body={"melbo": {"run": "raw", "vector": 2}})
        ids = encode_prompt(lm.tokenizer, PROMPT, PromptFormat(chat_template=False), lm.device)
        assert reply.choices[0].text == generate_steered(lm.model, lm.tokenizer, ids, Catalog([run]).runs["raw"].run.vectors[2:3], LAYER, max_new_tokens=6)[0]
        described = httpx.get(server.url + "/v1/runs").json()["data"][0]
        assert described["chat_template"] is False and described["system"] is None
    finally:
        server.close()
