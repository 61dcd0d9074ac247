"""The explorer page in headless Chromium (Playwright): type a prompt, compare two vectors, see every stream; model
text that holds markup stays text. The model behind the API is replaced by a batcher that streams planted text."""

from __future__ import annotations

import contextlib
import threading

import pytest
from test_report_browser import ARGS, CHROMIUM
from test_serve import PROMPT, Server, make_run

from melbo.model.loading import load_model
from melbo.serve.api import ServeLimits, create_app
from melbo.serve.batching import Request
from melbo.serve.catalog import Catalog

PLANTED = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> & more'

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium); the explorer's browser test is skipped")


class PlantedBatcher:
    """Streams, word by word, a text that names the vector (and carries markup) instead of running a model."""

    def __init__(self) -> None:
        self.seen: list[Request] = []
        self.queue = None

    def submit(self, request: Request) -> None:
        self.seen.append(request)
        text = "plain unsteered answer" if request.vector is None else f"vector norm {float(request.vector.norm()):.1f} says {PLANTED}"

        def run() -> None:
            words = text.split(" ")
            for k, word in enumerate(words):
                last = k == len(words) - 1
                request.emit(word + ("" if last else " "), "stop" if last else None)

        threading.Timer(0.05, run).start()

    def close(self) -> None:
        pass


@contextlib.contextmanager
def explorer(lm, run, name: str):
    """The explorer at ``/?run=NAME`` in headless Chromium, the API behind it on a :class:`PlantedBatcher`; yields
    (page, batcher, problems: page errors, console errors and requests that left this server, in the order seen)."""
    from playwright.sync_api import expect, sync_playwright

    batcher = PlantedBatcher()
    server = Server(create_app(lm, Catalog([run]), ServeLimits(), batcher=batcher))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page()
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("request", lambda r: problems.append(f"request: {r.url}") if not r.url.startswith(server.url) else None)
            page.goto(server.url + f"/?run={name}")
            expect(page.locator("#run")).to_have_value(name)
            yield page, batcher, problems
            browser.close()
    finally:
        server.close()


def compare(page, indices: str, columns: int):
    """Type PROMPT, pick ``indices``, press Compare: the page's columns (the unsteered one first), once ``columns`` are there."""
    from playwright.sync_api import expect

    page.fill("#prompt", PROMPT)
    page.fill("#indices", indices)
    page.click("#go")
    shown = page.locator(".column")
    expect(shown).to_have_count(columns)
    return shown


def test_compare_two_vectors_streams_and_planted_markup_stays_text(tiny_folder, tmp_path):
    from playwright.sync_api import expect

    run = make_run(tmp_path / "tinyrun", str(tiny_folder))
    with explorer(load_model(str(tiny_folder), device="cpu"), run, "tinyrun") as (page, batcher, problems):
        columns = compare(page, "1, 4", 3)
        expect(columns.nth(0).locator("pre")).to_have_text("plain unsteered answer")
        for k in (1, 2):
            expect(columns.nth(k).locator("pre")).to_contain_text(PLANTED)
            expect(columns.nth(k).locator(".status")).to_have_text("done (stop)")
        assert page.evaluate("window.__pwned") is None and page.locator(".column img").count() == 0
        assert [r.vector is not None for r in batcher.seen] == [False, True, True]
        assert sorted(round(float(r.vector.norm()), 3) for r in batcher.seen[1:]) == [3.0, 3.0]
        page.fill("#indices", "9")
        page.click("#go")
        expect(page.locator("#message")).to_have_text("vectors are 0 to 5")
        assert problems == []


def test_the_explorer_asks_with_the_runs_system_prompt(tiny_folder, tmp_path):
    """A run made with a system prompt is asked with it (the explorer sent a bare user message whatever the run)."""
    from playwright.sync_api import expect

    from melbo.model.prompts import PromptFormat, encode_prompt

    run = make_run(tmp_path / "sysrun", str(tiny_folder), system="Be brief.")
    lm = load_model(str(tiny_folder), device="cpu")
    with explorer(lm, run, "sysrun") as (page, batcher, problems):
        expect(compare(page, "0", 2).locator(".status")).to_have_text(["done (stop)", "done (stop)"])
        wanted = encode_prompt(lm.tokenizer, PROMPT, PromptFormat(system="Be brief."), lm.device)[0].tolist()
        assert [r.prompt_ids for r in batcher.seen] == [wanted] * 2  # as the run was made, the system turn included
        assert problems == []


def test_the_explorer_asks_a_raw_prompt_run_through_completions(tiny_folder, tmp_path):
    """A run made with raw prompts (Gemma 3 270M, a base model without a chat template): the explorer sent every column
    to /v1/chat/completions and showed "Internal Server Error" in each. It now asks /v1/completions with the raw prompt,
    the run's own format, and streams the text."""
    from playwright.sync_api import expect

    run = make_run(tmp_path / "rawrun", str(tiny_folder), chat_template=False)
    lm = load_model(str(tiny_folder), device="cpu")
    lm.tokenizer.chat_template = None
    with explorer(lm, run, "rawrun") as (page, batcher, problems):
        asked: list[str] = []
        page.on("request", lambda r: asked.append(r.url.split("/", 3)[-1]) if r.method == "POST" else None)
        columns = compare(page, "2", 2)
        expect(columns.nth(0).locator("pre")).to_have_text("plain unsteered answer")
        expect(columns.nth(1).locator(".status")).to_have_text("done (stop)")
        expect(columns.nth(1).locator("h2")).to_have_text("#2 · other · norm 3.0")  # one decimal, as the report's norms
        assert asked == ["v1/completions", "v1/completions"]
        assert [r.prompt_ids for r in batcher.seen] == [lm.tokenizer(PROMPT).input_ids] * 2  # the raw prompt, no template
        assert problems == []
