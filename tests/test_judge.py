"""The concept judge against real HTTP on loopback: a small fake OpenAI-compatible server for exact parsing, retries,
429, timeouts and garbage; melbo serve itself (SmolLM2) for the protocol."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, melbo, melbo_here

from melbo.analysis.evaluate import EvalResults
from melbo.analysis.judge import PRESETS, JudgeConfig, JudgeError, harmonic, judge_run, parse_rating, rating_key
from melbo.errors import MelboError
from melbo.files.io import read_json, write_json
from melbo.files.runs import write_run

PROMPT = "Write a Python function that reverses a string."
TEXTS = {"0": "def reverse(s):\n    return s[::-1]", "1": "def rev(x): return x[::-1]", "2": "I like turtles very much."}


def rater(body: dict) -> str:
    """The fake judge's answer: concept 2 when the fragment holds 'def', instruction 1, fluency 2."""
    prompt = body["messages"][0]["content"]
    fragment = prompt.split("[Fragment]\n", 1)[1]
    if "[Concept]" in prompt:
        return f"It {'defines' if 'def ' in fragment else 'has no'} code. Rating: [[{2 if 'def ' in fragment else 0}]]"
    return "Somewhat. Rating: [[1]]" if "[Instruction]" in prompt else "Fluent.\nRating: [[2]]"


class FakeJudge:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 whose answers a test scripts: ``script(n, body)`` returns
    (status, payload, headers) for the n-th chat request. At most ``limit`` requests are served, then the server stops."""

    def __init__(self, script: Callable[[int, dict], tuple[int, object, dict]], limit: int = 400) -> None:
        self.chat_requests: list[dict] = []
        self.keys: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, payload: object, headers: dict | None = None) -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except BrokenPipeError:  # the client gave up (a timeout test)
                    pass

            def do_GET(self) -> None:
                self._send(200, {"object": "list", "data": [{"id": "fake-judge", "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.keys.append(self.headers.get("Authorization"))
                outer.chat_requests.append(body)
                if len(outer.chat_requests) > limit:
                    self._send(503, {"error": "limit"})
                    return
                status, payload, headers = script(len(outer.chat_requests), body)
                self._send(status, payload, headers)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def chat(text: str) -> tuple[int, object, dict]:
    return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}, {}


@pytest.fixture
def judge_server(request):
    servers: list[FakeJudge] = []

    def start(script, limit: int = 400) -> FakeJudge:
        servers.append(FakeJudge(script, limit))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def results():
    data = {"prompts": {PROMPT: {"completions": {"greedy": {i: [{"label": "code" if "def" in t else "other", "rule": "", "text": t}] for i, t in TEXTS.items()}}}}}
    return EvalResults.from_json(data)


def fast(url: str, **kw) -> JudgeConfig:
    return JudgeConfig(**{"url": url, "concepts": ["code"], "backoff": 0.01, "timeout": 5.0, **kw})


def test_a_judge_that_rates_everything_2_is_flagged_against_the_regex_label(judge_server, results):
    """A weak judge (Qwen2.5 0.5B judging its own copies) rated "The capital of Australia is Sydney." as code 2; the
    summary said only "agrees with melbo's regex label 62%". It now says which way they disagree, and to read answers."""
    from melbo.output.tables import judged

    server = judge_server(lambda n, body: chat("Rating: [[2]]"))
    stored = judge_run(results, fast(server.url), PROMPT, 0, lambda: None)
    summary = stored.summary["code"]
    assert summary.label_agreement == pytest.approx(2 / 3)
    assert (summary.judge_only, summary.regex_only, summary.compared) == (1, 0, 3)  # 'I like turtles' rated 2
    lines = judged(stored, PROMPT, 0, results)
    assert "    on every prompt the eval asked: rated 2 where melbo's regex label is not 'code': 1 of 3; labelled 'code' but rated below 2: 0" in lines
    assert any(line.startswith("    the judge and the regex label disagree on 33% of the completions: read some of the judge's answers") for line in lines)
    # a summary stored before the counts existed still reads, and says nothing of them
    old = type(summary)(**{k: v for k, v in summary.to_json().items() if k not in ("judge_only", "regex_only", "compared")})
    assert old.disagreement("code") == ""


def test_parsing_and_harmonic_mean():
    assert parse_rating("Clear. Rating: [[2]]") == 2
    assert parse_rating("rating: [[ 1 ]] … no wait. Rating: [[0]]") == 0  # the last one wins
    assert parse_rating("Rating: 1") == 1 and parse_rating("**Rating:** [[2]]") == 2
    assert parse_rating("I would say two.") is None and parse_rating("Rating: [[7]]") is None and parse_rating(None) is None
    assert harmonic([2, 2, 2]) == 2 and harmonic([2, 1, 2]) == pytest.approx(1.5) and harmonic([2, 0, 2]) == 0
    assert harmonic([2, None, 2]) is None


def test_scores_summary_and_cache(judge_server, results, monkeypatch):
    server = judge_server(lambda n, body: chat(rater(body)))
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-secret")
    saved: list[str] = []
    stored = judge_run(results, fast(server.url, key_env="MY_JUDGE_KEY"), PROMPT, 0, lambda: saved.append(json.dumps(results.to_json())))
    assert len(server.chat_requests) == 9  # 3 completions × (1 concept + instruction + fluency)
    assert set(server.keys) == {"Bearer sk-secret"} and "sk-secret" not in saved[-1]  # sent, never stored
    assert stored.model == "fake-judge" and stored.host.startswith("127.0.0.1:")
    scores = {s.item.index: s.score for s in stored.scores["code"] if s.item.source == "copies"}
    assert scores[1].to_json() == {"concept": 2, "instruction": 1, "fluency": 2, "harmonic": pytest.approx(1.5)}
    assert scores[2].concept == 0 and scores[2].harmonic == 0
    summary = stored.summary["code"]
    assert summary.share_concept_2 == 0.5  # copies 1 and 2 (0 is the base)
    assert summary.label_agreement == 1.0 and summary.unrated == 0
    assert (summary.judge_only, summary.regex_only, summary.compared) == (0, 0, 3)  # the base's completion is compared too
    assert stored.concepts == {"code": PRESETS["code"]}
    key = rating_key("fake-judge", "concept", PRESETS["code"], PROMPT, TEXTS["1"])
    assert stored.ratings[key].rating == 2 and "Rating: [[2]]" in stored.ratings[key].raw
    assert json.loads(saved[-1])["judge"]["ratings"][key]["rating"] == 2  # in eval.json
    again = judge_run(results, fast(server.url), PROMPT, 0, lambda: None)
    assert len(server.chat_requests) == 9 and again.requests_last_call == 1  # only /models: every rating from the cache


def test_429_and_5xx_are_retried_with_backoff(judge_server, results):
    def script(n, body):
        if n <= 2:
            return 429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}
        if n == 3:
            return 502, {"error": "bad gateway"}, {}
        return chat(rater(body))

    server = judge_server(script)
    stored = judge_run(results, fast(server.url, concurrency=1), PROMPT, 0, lambda: None)
    assert len(server.chat_requests) == 12 and stored.summary["code"].unrated == 0


def test_a_timeout_is_retried_and_a_dead_judge_is_one_error(judge_server, results):
    def script(n, body):
        if n == 1:
            time.sleep(1.5)
        return chat(rater(body))

    server = judge_server(script)
    stored = judge_run(results, fast(server.url, concurrency=1, timeout=0.5), PROMPT, 0, lambda: None)
    assert stored.summary["code"].unrated == 0 and len(server.chat_requests) == 10
    always = judge_server(lambda n, body: (500, {"error": "down"}, {}))
    fresh = EvalResults.from_json({"prompts": {PROMPT: {"completions": {"greedy": {"1": [{"label": "other", "rule": "", "text": "new"}]}}}}})
    with pytest.raises(JudgeError, match="after 3 tries"):
        judge_run(fresh, fast(always.url, retries=2, concurrency=1), PROMPT, None, lambda: None)
    assert len(always.chat_requests) == 3


def test_garbage_is_recorded_as_unparsed_not_zero_and_repeated_garbage_stops(judge_server, results):
    def script(n, body):
        if "rate the fluency" in body["messages"][0]["content"]:
            return 200, b"<html>not json</html>", {}
        return chat(rater(body))

    server = judge_server(script)
    stored = judge_run(results, fast(server.url), PROMPT, 0, lambda: None)
    score = next(s.score for s in stored.scores["code"] if s.item.index == 1)
    assert score.fluency is None and score.harmonic is None and score.concept == 2
    assert stored.summary["code"].unrated == 3
    nonsense = judge_server(lambda n, body: chat("What a lovely fragment!"))
    many = EvalResults.from_json({"prompts": {PROMPT: {"completions": {"greedy": {str(i): [{"label": "other", "rule": "", "text": f"t{i}"}] for i in range(6)}}}}})
    with pytest.raises(JudgeError, match="without a rating"):
        judge_run(many, fast(nonsense.url, concurrency=1), PROMPT, None, lambda: None)
    assert len(nonsense.chat_requests) <= 9  # it stopped asking


def test_shell_judge_one_line_errors_and_nothing_written(judge_server, tmp_path):
    folder = tmp_path / "run"
    write_run(folder, torch.zeros(3, 8), {"kind": "ortho", "prompts": [PROMPT], "layers": {"source": 1, "target": 2},
                                                       "vectors": [{"index": i, "base": i == 0} for i in range(3)]})
    data = {"prompts": {PROMPT: {"completions": {"greedy": {i: [{"label": "other", "rule": "", "text": t}] for i, t in TEXTS.items()}}}}}
    write_json(folder / "eval.json", data)
    before = (folder / "eval.json").read_text()
    assert_one_line_error(melbo_here("judge", str(folder), "--judge", "ftp://example.org/v1"), "give an http:// or https:// URL")
    assert_one_line_error(melbo_here("judge", str(folder), "--judge", "http://127.0.0.1:9/v1", "--judge-model", "m"), "cannot get an answer from the judge")
    assert_one_line_error(melbo_here("judge", str(folder), "--judge", "http://127.0.0.1:9/v1", "--concept", "nonsense"), "use a preset")
    assert_one_line_error(melbo_here("judge", str(folder), "--judge", "http://127.0.0.1:9/v1", "--judge-timeout", "0"), "--judge-timeout positive")
    assert (folder / "eval.json").read_text() == before
    server = judge_server(lambda n, body: (time.sleep(1.5) if n == 1 else None) or chat(rater(body)))
    result = melbo("judge", str(folder), "--judge", server.url, "--concept", "code", "--concept", "turtles: the text mentions turtles",
                   "--judge-timeout", "0.5", "--judge-concurrency", "1")
    assert result.returncode == 0, result.stderr
    assert len(server.chat_requests) == 3 * 4 + 1  # 3 completions × (2 concepts + instruction + fluency), the slow first one again
    assert "code: 50% of the copies rated 2" in result.stdout and "turtles:" in result.stdout
    assert set(read_json(folder / "eval.json")["judge"]["summary"]) == {"code", "turtles"}


@pytest.mark.slow
def test_melbo_serve_is_a_judge(smollm, results, tmp_path):
    """The protocol end to end with a real OpenAI-compatible server: melbo serve with SmolLM2 answering as the judge."""
    from test_serve import Server, make_run

    from melbo.serve.api import ServeLimits, create_app
    from melbo.serve.catalog import Catalog

    folder = tmp_path / "smolrun"
    make_run(folder, "smollm2", d=576)
    server = Server(create_app(smollm, Catalog([folder]), ServeLimits(max_tokens=32, max_queue=16, max_batch=8)))
    try:
        small = EvalResults.from_json({"prompts": {PROMPT: {"completions": {"greedy": {"1": [{"label": "code", "rule": "", "text": TEXTS["1"]}]}}}}})
        stored = judge_run(small, JudgeConfig(url=server.url + "/v1", concepts=["code"], max_tokens=24, timeout=120), PROMPT, None, lambda: None)
    finally:
        server.close()
    assert stored.model == "smollm2"  # listed by the server's /v1/models
    ratings = list(stored.ratings.values())
    assert len(ratings) == 3 and all(r.raw for r in ratings)  # three answers came back; a rating where SmolLM2 gave one
    assert all(r.rating in (None, 0, 1, 2) for r in ratings)


def test_a_study_judges_its_runs_and_shows_controls_and_judge_everywhere(judge_server, char_tokenizer, tmp_path):
    """[eval] controls = true and judge = {…}: study.json, study.html and the run's report show both; a resumed study
    asks the judge nothing again."""
    from conftest import make_tiny_model
    from test_study import tiny_demo

    from melbo.model.loading import LoadedModel
    from melbo.study import ModelCache, Study, run_study

    server = judge_server(lambda n, body: chat(rater(body)))
    lm = LoadedModel(make_tiny_model("llama", n_layers=6, initializer_range=0.3), char_tokenizer, "tiny", {"id": "tiny"})
    study = Study.from_dict(tiny_demo(eval={"max_new_tokens": 6, "controls": True, "judge": {"url": server.url, "concepts": ["code", "alien"], "backoff": 0.01}}))
    result = run_study(study, tmp_path / "s", models=ModelCache({"tiny": lm}))
    outcome = result.units[0].orthos[0]
    assert outcome.controls is not None and set(outcome.judged) == {"code", "alien"}
    asked = len(server.chat_requests)
    assert asked > 0
    page = (tmp_path / "s" / "study.html").read_text()
    from melbo.labels import NO_BEHAVIOUR  # a base labelled "other" is read by its text on the run's prompt, not the share

    controls = "run-prompt base NLL: copies" if outcome.base.label in NO_BEHAVIOUR else "share: copies"
    assert "judge: copies rated 2" in page and controls in page
    report = (tmp_path / "s" / "ortho" / "report.html").read_text()
    assert 'id=judge-table' in report and 'id=controls-table' in report and "judge: code (mean harmonic)" in report
    assert "Base NLL per prompt" in report and "(trained on)" in report
    assert "<th class=num>random_<wbr>same_<wbr>norm</th>" in report  # a long name wraps in its fixed-width column
    from melbo.output.tables import study_units  # what `melbo study` prints: the verdict too, not only in the page

    printed = [str(line) for line in study_units(result, 1.0) if isinstance(line, str)]
    assert printed[0] == "controls (eval with controls = true):" and printed[1].endswith(f"ortho: {outcome.controls.verdict}")
    import io

    from rich.console import Console

    from melbo.labels import NO_BEHAVIOUR

    shown = Console(width=200, file=io.StringIO(), record=True)
    shown.print(study_units(result, 1.0)[0])
    row = next(line for line in shown.export_text().splitlines() if "│ ortho" in line)
    share = row.split("│")[6].strip()  # no share for a base whose label names no behaviour, as on the study's page
    assert share == "—" if outcome.base.label in NO_BEHAVIOUR else share.endswith("%"), (outcome.base.label, row)
    with pytest.raises(MelboError, match="judge has no setting 'adress'"):
        Study.from_dict(tiny_demo(eval={"judge": {"adress": "http://127.0.0.1:1/v1"}}))
    with pytest.raises(MelboError, match="http:// or https://"):
        Study.from_dict(tiny_demo(eval={"judge": {"url": "file:///etc/passwd"}}))
    (tmp_path / "s" / "study.json").write_text((tmp_path / "s" / "study.json").read_text().replace('"eval:ortho"', '"eval:redo"'))
    run_study(study, tmp_path / "s", resume=True, models=ModelCache({"tiny": lm}))
    assert len(server.chat_requests) == asked  # the eval ran again; every rating came from eval.json


POST = Path(__file__).resolve().parents[2] / "shared" / "reference" / "melbo-ortho-post"


@pytest.mark.skipif(not POST.is_dir(), reason="../shared/reference/melbo-ortho-post is not beside the project")
def test_the_posts_published_dump_is_judged_per_hundred_beside_the_regex_labels(judge_server, tmp_path):
    """melbo judge on an imported post dump (no model loads): the share rated 2 per hundred vectors, beside melbo's
    regex share per hundred (the post read 96/83/36/8 % code in the 800s–1100s)."""
    from melbo.files.postdump import import_post_dump

    folder = import_post_dump(POST / "code-vectors-bomb.txt", tmp_path / "post")
    server = judge_server(lambda n, body: chat(rater(body)), limit=6000)
    result = melbo("judge", str(folder), "--judge", server.url, "--concept", "code", "--judge-concurrency", "16")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    judged = next(line for line in lines if "rated 2 per hundred vectors" in line)
    regex = next(line for line in lines if "regex label 'code' per hundred" in line)
    assert judged.count("%") == regex.count("%") == 16  # vectors 0–1557: sixteen hundreds
    assert "0+: 100%" in regex
