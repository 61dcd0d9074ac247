"""The report in a real browser: headless Chromium (Debian's package) driven by Playwright.

Skips, saying why, where Chromium or Playwright is missing (scripts/setup installs both when it can:
Chromium needs apt and root).
"""

from __future__ import annotations

import shutil

import pytest
from report_runs import make_run

from melbo.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium); the browser test of the report is skipped"
)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def open_report(browser, run):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("request", lambda r: problems.append(f"request: {r.url}") if not r.url.startswith(("file:", "data:")) else None)
    page.goto(write_report(run).resolve().as_uri())
    page.wait_for_selector("body[data-ready='1']")
    return page, problems


def expect(locator):
    from playwright.sync_api import expect as playwright_expect  # waits without evaluating code (the page's CSP forbids eval)

    return playwright_expect(locator)


def visible_indices(page) -> list[int]:
    return [int(i) for i in page.eval_on_selector_all("#rows tr.row", "rows => rows.map(r => r.dataset.index)")]


def test_page_loads_plots_render_and_planted_script_never_runs(browser, tmp_path):
    page, problems = open_report(browser, make_run(tmp_path / "run", n=30))
    assert problems == []
    widths = page.eval_on_selector_all("figure img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
    assert len(widths) == 4 and all(w > 300 for w in widths)  # kl, norm, labels, cosine (no probe/compose here)
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#rows pre", has_text="<script>window.__pwned = 1</script>").count() == 6  # shown as text
    assert page.locator("#rows pre", has_text='</textarea></script><img src=x onerror="window.__pwned = 2">').count() == 6
    assert page.locator("#rows img").count() == 0  # the planted <img> did not become an element
    assert page.text_content("#count") == "30 of 30 vectors"


def test_filter_search_sort_expand_and_pages(browser, tmp_path):
    page, problems = open_report(browser, make_run(tmp_path / "run", n=250))
    assert visible_indices(page) == list(range(100))  # 100 rows per page
    page.click("#next")
    assert visible_indices(page)[0] == 100
    page.select_option("#label-filter", "refusal")
    assert visible_indices(page) == [i for i in range(250) if i % 5 == 1][:100]
    assert page.text_content("#count") == "50 of 250 vectors"
    page.select_option("#label-filter", "")
    page.fill("#search", "dragon")
    expect(page.locator("#count")).to_have_text("50 of 250 vectors")
    assert all(i % 5 == 2 for i in visible_indices(page))
    page.fill("#search", "#249")
    expect(page.locator("#count")).to_have_text("1 of 250 vectors")
    page.fill("#search", "")
    expect(page.locator("#count")).to_have_text("250 of 250 vectors")
    page.click("th[data-key=kl]")  # largest KL first
    assert visible_indices(page)[:3] == [249, 248, 247]
    page.click("th[data-key=kl]")
    assert visible_indices(page)[:3] == [0, 1, 2]
    page.click("#rows tr.row >> nth=1")
    assert page.locator("#rows tr.open").count() == 1
    assert "top 5:" in page.text_content("#rows tr.open")
    assert problems == []


def test_fifteen_hundred_vectors_stay_usable(browser, tmp_path):
    page, problems = open_report(browser, make_run(tmp_path / "run", n=1600, d=32))
    assert page.text_content("#count") == "1600 of 1600 vectors" and len(visible_indices(page)) == 100
    assert page.locator("#rows tr").count() == 100  # only one page of rows is ever in the document
    page.fill("#search", "ship")
    expect(page.locator("#count")).to_have_text("320 of 1600 vectors")
    assert problems == []


def run_with_completion(folder, n: int, index: int, text: str):
    """``make_run``'s run with vector ``index``'s evaluated completion replaced by ``text``."""
    import json

    run = make_run(folder, n=n)
    results = json.loads((run / "eval.json").read_text(encoding="utf-8"))
    next(iter(results["prompts"].values()))["completions"]["greedy"][str(index)][0]["text"] = text
    (run / "eval.json").write_text(json.dumps(results), encoding="utf-8")
    return run


def test_an_empty_completion_reads_no_text(browser, tmp_path):
    """A vector whose completion is empty (the model ended at once) shows "(no text)", not an empty cell."""
    page, problems = open_report(browser, run_with_completion(tmp_path / "run", 5, 3, ""))
    cells = page.eval_on_selector_all("#rows tr.row pre.completion", "pres => pres.map(p => [p.textContent, p.className])")
    assert cells[3] == ["(no text)", "completion empty"] and all(text.strip() and text != "(no text)" for text, _ in cells[:3] + cells[4:])
    assert problems == []


def test_a_closed_row_shows_its_completion_from_the_first_line_with_text(browser, tmp_path):
    """Gemma's completions often open with blank lines; a closed row (a few lines high) starts at the text, an open one shows it whole."""
    page, problems = open_report(browser, run_with_completion(tmp_path / "run", 3, 1, "\n\n  \nWe'd love to hear from you!"))
    cell = page.locator("#rows tr.row").nth(1).locator("pre.completion")
    assert cell.text_content() == "We'd love to hear from you!"
    page.locator("#rows tr.row").nth(1).click()
    expect(page.locator("#rows tr.row.open")).to_have_count(1)
    assert page.locator("#rows tr.row.open pre.completion").first.text_content() == "\n\n  \nWe'd love to hear from you!"
    assert problems == []


def test_an_open_row_shows_what_the_judge_said_of_each_completion(browser, tmp_path):
    """"Check a sample of answers before trusting a share": an open row gives each completion's three ratings and,
    a click away, the judge's own words on the concept (a 0.5B judge rated "The capital of Australia is Sydney." code
    2 on Qwen's copies, which the summary's 62% agreement only hinted at); a closed row shows none of it."""
    from report_runs import PLANTED, PROMPT

    from melbo.analysis.evaluate import EvalResults
    from melbo.analysis.judge import PRESETS, TEMPLATE_VERSION, ConceptSummary, Item, JudgeResults, Rating, Score, Scored, rating_key

    run = make_run(tmp_path / "run", n=3)
    results = EvalResults.read(run)
    judge = JudgeResults("127.0.0.1:1", "fake-judge", TEMPLATE_VERSION, {"code": PRESETS["code"]})
    scored = []
    for i in range(3):
        text = f"{PLANTED[i]} #{i}"
        judge.ratings[rating_key("fake-judge", "concept", PRESETS["code"], PROMPT, text)] = Rating(2 * (i == 0), f"Vector {i}: <b>why</b>. Rating: [[{2 * (i == 0)}]]")
        scored.append(Scored(Item(PROMPT, text, "copies", i, "greedy"), Score(2 * (i == 0), 1, None if i == 2 else 2)))
    judge.scores, judge.summary = {"code": scored}, {"code": ConceptSummary(PRESETS["code"], 0.0, {"copies": 0.0}, 1, 0.5, 1, 0, 2)}
    results.judge = judge
    results.save(run)
    page, problems = open_report(browser, run)
    expect(page.locator("#judge-table p")).to_have_text(  # where the judge and the regex label disagree, and which way
        "code, on every prompt the eval asked: rated 2 where melbo's regex label is not 'code': 1 of 2; labelled 'code' but rated "
        "below 2: 0. The judge and the regex label disagree often: open a vector's row below to read the judge's answers before trusting either.")
    assert page.locator("#rows .judge").count() == 0  # closed rows
    page.locator("#rows tr.row").nth(2).click()
    line = page.locator("#rows tr.row.open .judge")
    expect(line).to_have_count(1)
    assert line.locator("span, div").count() == 0 and line.text_content().startswith("judge · code: concept 0, instruction 1, fluency —")
    line.locator("summary").click()  # opens the answer; the row stays open
    expect(line.locator("details[open] pre")).to_have_text("Vector 2: <b>why</b>. Rating: [[0]]")  # as text, never markup
    expect(page.locator("#rows tr.row.open")).to_have_count(1)
    page.locator("#rows tr.row").nth(0).click()
    assert page.locator("#rows tr.row.open .judge").first.text_content().startswith("judge · code: concept 2, instruction 1, fluency 2")
    assert problems == []
