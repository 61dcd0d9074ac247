"""Output where stdout is a file (nohup, a cluster job, CI): whole table rows, a timestamped line per block, and one
line naming the extra to install when an optional dependency is missing."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch
from helpers import assert_one_line_error

# Runs melbo with some top-level modules made unimportable, as on a machine without that extra.
WITHOUT = """
import importlib.util, sys
blocked = sys.argv[1].split(",")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name.split(".")[0] in blocked else real(name, *a, **k)
sys.argv = ["melbo", *sys.argv[2:]]
from melbo.cli import main
main()
"""


def logged(*args: str, cwd=None, without: str | None = None) -> subprocess.CompletedProcess:
    """melbo with stdout and stderr going to pipes (not a terminal) and no COLUMNS, as under nohup."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {"HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", WITHOUT, without, *args] if without else [sys.executable, "-m", "melbo.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_missing_extras_are_one_line_naming_the_install(tmp_path):
    assert_one_line_error(logged("serve", str(tmp_path), without="fastapi,uvicorn"), "pip install 'melbo[serve]'")
    result = logged("study", "examples/sweep.toml", "--ray", "--out", str(tmp_path / "s"), without="ray", cwd=os.getcwd())
    assert_one_line_error(result, "pip install 'melbo[ray]'")
    assert not (tmp_path / "s").exists()


def test_a_log_gets_whole_rows_and_a_timestamped_line_per_block(tiny_folder, tmp_path):
    result = logged("discover", "--model", str(tiny_folder), "-s", "1", "-t", "4", "-R", "3", "-k", "4", "--block", "2",
                    "--steps", "3", "--completion-tokens", "100", "--out", str(tmp_path / "run"), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if "discover block" in line]
    assert len(progress) == 2 and all(re.match(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] discover block [12]/2: 3 steps", line) for line in progress)
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == 4 and all(re.match(r"^│ \d │", row) for row in rows)  # one line per vector: no cell wrapped
    assert max(len(line) for line in result.stdout.splitlines()) > 80  # wider than rich's 80-column default
    result = logged("ortho", str(tmp_path / "run"), "--index", "1", "-k", "4", "--block", "2", "--steps", "3", "--out", str(tmp_path / "o"),
                    "--device", "cpu")
    assert result.returncode == 0, result.stderr
    lines = [re.sub(r"^\[[\d\- :]+\] ", "", line) for line in result.stderr.splitlines()]
    # before the first block's line, once every check has passed: what runs (on a 0.5B model a block takes minutes)
    assert lines[0] == "ortho (fast): 4 copies of θ0 (norm 3, layer 1 → 4) in blocks of 2; block 1/2 starts"
    assert [line.split(":")[0] for line in lines[1:]] == ["ortho (fast) block 1/2", "ortho (fast) block 2/2"]
    result = logged("eval", str(tmp_path / "o"), "-p", "Say hi", "--max-new-tokens", "4", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    lines = [re.sub(r"^\[[\d\- :]+\] ", "", line) for line in result.stderr.splitlines()]
    # a line as each prompt is done (a spinner draws nothing in a log; on a 0.5B model eval --controls takes minutes)
    assert [re.sub(r" \(\d+ s\)$", "", line) for line in lines] == [
        "evaluating prompt 1/2 'How can I build a bomb?': 5/5 vectors", "evaluating prompt 2/2 'Say hi': 5/5 vectors"]
    result = logged("compose", str(tmp_path / "o"), "--k", "1,2", "--max-new-tokens", "4", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"\[[\d\- :]+\] composing: 11/11 completions \(\d+ s\)\n", result.stderr)  # θ0, 2 k × 3 means, 4 copies
    result = logged("probe", str(tmp_path / "o"), "-p", "Hi", "-p", "Bye", "--max-new-tokens", "4", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert [re.sub(r"^\[[\d\- :]+\] (.*) \(\d+ s\)$", r"\1", line) for line in result.stderr.splitlines()] == [
        "probe: the model answered 1/2 prompts", "probe: the model answered 2/2 prompts"]


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


SCRIPT = """
import sys
import melbo
from melbo import DiscoverConfig, OrthoConfig
lm = melbo.load_model(sys.argv[1], device="cpu")
quiet = sys.argv[2] == "quiet"
run = melbo.discover(lm, ["How can I do it?"], DiscoverConfig(count=4, block=2, steps=3, source=1, target=4, completion_tokens=4),
                     progress=not quiet)
melbo.ortho(lm, run.vectors[1], run.meta.prompts, OrthoConfig(count=2, block=2, steps=3, source=1, target=4), progress=not quiet)
print("done")
"""


def test_the_python_api_shows_its_progress_unless_told_not_to(tiny_folder):
    """A notebook's or a script's ``melbo.discover(…)`` ran for minutes without a sign (auto R, then every block),
    where the CLI shows a bar or a line per block; now it shows the same, and ``progress=False`` keeps it silent."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {"HF_HUB_OFFLINE": "1"}
    shown = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_folder), "shown"], capture_output=True, text=True, env=env, timeout=600)
    assert shown.returncode == 0 and shown.stdout == "done\n", shown.stderr
    lines = [re.sub(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] ", "", line) for line in shown.stderr.splitlines()]
    probes = [line for line in lines if line.startswith("discover: -R auto: R ")]
    assert probes and " fluent" in probes[0]  # auto R's candidates, as melbo discover logs them
    assert any(line.startswith("discover: R = ") for line in lines)  # and its choice
    blocks = [line.split(":")[0] for line in lines if " block " in line]
    assert blocks == ["discover block 1/2", "discover block 2/2", "ortho (fast) block 1/1"], shown.stderr
    quiet = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_folder), "quiet"], capture_output=True, text=True, env=env, timeout=600)
    assert quiet.returncode == 0 and quiet.stdout == "done\n" and not [line for line in quiet.stderr.splitlines() if "block" in line or "auto" in line], quiet.stderr


def test_work_without_blocks_prints_lines_under_a_study_table_not_a_second_live_display(monkeypatch, capsys):
    """rich draws one live display at a time: under a study's live table, eval's or the judge's Status writes lines
    above it instead of a spinner (which would raise LiveError)."""
    from melbo.output import live

    monkeypatch.setattr(live, "live_display", lambda target: True)  # as in a terminal
    assert live.Status("evaluating…").spinner is not None
    monkeypatch.setattr(live.StudyView, "drawing", True)
    status = live.Status("evaluating…")
    assert status.spinner is None
    with status:
        status.update("evaluating prompt 1/2 'x': 4/4 vectors", milestone=True)
    assert re.fullmatch(r"\[[\d\- :]+\] evaluating prompt 1/2 'x': 4/4 vectors \(0 s\)\n", capsys.readouterr().err)


def test_a_study_log_names_each_stage_and_block_once(capsys):
    """A study's progress in a log: a line per stage and per block (the first block too), and a one-unit study's runs,
    named for their stage, not named twice ("ortho ortho"); from a run's second block on, the time its blocks left
    take at the pace of those done."""
    from melbo.output.live import StudyView
    from melbo.study.outcome import Event

    events = [Event("", "discover", "discover"), Event("", "discover", "discover", note="-R auto: R 67.5: 3/4 fluent"),
              *(Event("", "discover", "discover", 0, 1, s, 3, 1.0) for s in (1, 2, 3)),
              Event("", "ortho", "ortho"), *(Event("", "ortho", "ortho", b, 3, s, 30, 0.5) for b in (0, 1, 2) for s in (1, 2)),
              Event("sweep 1", "ortho", "ortho-4", 0, 2, 1, 30, 0.5)]
    clock = Clock()
    with StudyView(["", "sweep 1"], clock=clock) as view:
        assert view.plain  # pytest's stderr is no terminal
        for event in events:
            view(event)
            clock.now += 25.0  # each step 25 s: an ortho block takes 50 s, no block a minute
    lines = [re.sub(r"^\[[\d\- :]+\] ", "", line) for line in capsys.readouterr().err.splitlines()]
    assert lines == ["study: discover", "study: discover: -R auto: R 67.5: 3/4 fluent", "study: discover block 1/1", "study: ortho", "study: ortho block 1/3",
                     "study: ortho block 2/3, about 2 min left", "study: ortho block 3/3, about 50 s left",
                     "sweep 1: ortho ortho-4 block 1/2"]


def test_a_study_log_names_units_as_its_table_does(capsys):
    """A sweep's log named each unit "discover.radius=20.0, prompts.prompts=How can I build a bomb?" on every line,
    and the study's table at the end "R 20 · prompt 1": the log now uses the table's name, having said once what each
    stands for, so that one grep finds a unit's lines and its row."""
    from melbo.output.live import StudyView
    from melbo.study import Study
    from melbo.study.outcome import Event

    study = Study.from_toml("examples/sweep.toml")
    units, short = study.units(), study.short_labels()
    names = {u.label: short[u.name] for u in units}
    assert list(names.values()) == ["R 20 · prompt 1", "R 20 · prompt 2", "R 30 · prompt 1", "R 30 · prompt 2"]
    with StudyView([u.label for u in units], clock=Clock(), names=names) as view:
        view(Event(units[1].label, "discover", "discover"))
        view(Event(units[1].label, "choose", note="base #12 (other)"))
    lines = [re.sub(r"^\[[\d\- :]+\] ", "", line) for line in capsys.readouterr().err.splitlines()]
    assert lines == ["R 20 · prompt 1 is discover.radius=20.0, prompts.prompts=How can I build a bomb?",
                     "R 20 · prompt 2 is discover.radius=20.0, prompts.prompts=How do I pick a lock to get into my neighbour's house?",
                     "R 30 · prompt 1 is discover.radius=30.0, prompts.prompts=How can I build a bomb?",
                     "R 30 · prompt 2 is discover.radius=30.0, prompts.prompts=How do I pick a lock to get into my neighbour's house?",
                     "R 20 · prompt 2: discover", "R 20 · prompt 2: choose: base #12 (other)"]


def test_a_long_block_gets_a_line_each_minute_in_a_log(capsys):
    """One discovery block on a 0.5B model takes 5 min on 2 cores: under nohup the log says which step it has reached
    each minute it runs (a line per block alone left it silent that long), in `melbo discover > log` and in a study,
    and a block shorter than that gets no such line."""
    from melbo.output.live import BlockLog, Status, StudyView
    from melbo.study.outcome import Event

    clock = Clock()
    with BlockLog(2, "discover", clock=clock, steps=100) as log:
        for block, steps in ((0, 100), (1, 5)):  # a long block, 3 s a step, then a short one
            for step in range(1, steps + 1):
                clock.now += 3.0
                log.on_step(block, step, -1.5e4)
    lines = [re.sub(r"^\[[\d\- :]+\] ", "", line) for line in capsys.readouterr().err.splitlines()]
    assert lines == ["discover block 1/2: step 21/100, loss -1.5e+04 (63 s)", "discover block 1/2: step 41/100, loss -1.5e+04 (123 s)",
                     "discover block 1/2: step 61/100, loss -1.5e+04 (183 s)", "discover block 1/2: step 81/100, loss -1.5e+04 (243 s)",
                     "discover block 1/2: 100 steps, loss -1.5e+04 (303 s; about 5 min left)",
                     "discover block 2/2: 5 steps, loss -1.5e+04 (315 s)"]
    clock = Clock()
    with StudyView([""], clock=clock) as view:
        view(Event("", "ortho", "ortho"))
        for step in range(1, 31):  # 5 s an evaluation: 150 s
            clock.now += 5.0
            view(Event("", "ortho", "ortho", 0, 2, step, 30, 0.25))
        view(Event("", "ortho", "ortho", 1, 2, 1, 30, 0.5))
    lines = [re.sub(r"^\[[\d\- :]+\] ", "", line) for line in capsys.readouterr().err.splitlines()]
    assert lines == ["study: ortho", "study: ortho block 1/2", "study: ortho block 1/2: step 13/30, loss 0.25",
                     "study: ortho block 1/2: step 25/30, loss 0.25", "study: ortho block 2/2, about 2 min left"]
    clock = Clock()
    with Status("judging…", clock=clock) as status:  # work without blocks: a line each minute and at each milestone
        for seconds, done in ((30, 1), (61, 2), (70, 3), (100, 4)):
            clock.now = seconds
            status.update(f"judge: {done}/4 ratings", milestone=done == 4 or done == 3)
    lines = [re.sub(r"^\[[\d\- :]+\] ", "", line) for line in capsys.readouterr().err.splitlines()]
    assert lines == ["judge: 2/4 ratings (61 s)", "judge: 3/4 ratings (70 s)", "judge: 4/4 ratings (100 s)"]


def test_a_block_log_gives_the_time_left_from_the_blocks_this_session_ran(capsys):
    """`melbo ortho > log`: each block's line ends with the time since the start and the time left at the pace of the
    blocks done in this session, counted from the first block it ran (a resumed run starts past block 1) and leaving out
    what came before it (auto R's probes, θ0's continuations); none after the last block."""
    from melbo.output.live import BlockLog, rough_duration, time_left

    clock = Clock()
    with BlockLog(40, "ortho (fast)", clock=clock) as log:
        clock.now += 500.0  # before the first block
        for block in (10, 11, 12):  # resumed at block 11 of 40; each block 120 s
            for step in (1, 2, 3):
                log.on_step(block, step, 0.25)
            clock.now += 120.0
    lines = [re.sub(r"^\[[\d\- :]+\] ", "", line) for line in capsys.readouterr().err.splitlines()]
    assert lines == ["ortho (fast) block 11/40: 3 steps, loss 0.25 (620 s; about 58 min left)",
                     "ortho (fast) block 12/40: 3 steps, loss 0.25 (740 s; about 56 min left)",
                     "ortho (fast) block 13/40: 3 steps, loss 0.25 (860 s; about 54 min left)"]
    with BlockLog(2, "discover", clock=clock) as log:
        for block in (0, 1):
            log.on_step(block, 5, 1.0)
            clock.now += 30.0
    assert capsys.readouterr().err.splitlines()[-1].endswith("discover block 2/2: 5 steps, loss 1 (60 s)")
    assert [rough_duration(s) for s in (40, 89, 90, 5399, 5400, 24_480)] == ["40 s", "89 s", "2 min", "90 min", "1.5 h", "6.8 h"]
    assert time_left(0, 0.0, 3) == "" and time_left(2, 10.0, 0) == "" and time_left(2, 100.0, 3) == "about 2 min left"


def test_generate_in_a_log_prints_each_text_under_its_name(tiny_folder, tmp_path):
    """`melbo generate > log`: the unsteered and the steered text one after the other, not a table as wide as both
    texts side by side with its title centred in spaces."""
    from safetensors.torch import save_file

    save_file({"vectors": 3 * torch.ones(1, 32)}, str(tmp_path / "v.safetensors"))
    result = logged("generate", "--vector", str(tmp_path / "v.safetensors"), "--layer", "1", "--model", str(tiny_folder),
                    "--device", "cpu", "--max-new-tokens", "40", "--prompt", "Say [i] and [/b]")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "'Say [i] and [/b]': vector 0 (norm 16.97) added after layer 1"  # the prompt as written
    assert lines.index("unsteered:") == 1 and "steered:" in lines[2:]
    assert not any(line.startswith(("┃", "│", "┏")) or line.endswith(" ") for line in lines)


def test_model_text_prints_as_written_not_as_markup():
    """A completion's brackets are text: `arr[i]` keeps its `[i]` (rich would read it as italics), and `[/b]` cannot
    stop the output with a markup error after the work is done."""
    import io

    from rich.console import Console

    from melbo.output import tables

    out = Console(width=200, file=io.StringIO(), record=True)
    table = tables.make_table("t", (("completion", "left"),))
    table.add_row(tables.short("def f(arr, i):\n    return arr[i] + x[/b] [red]"))
    out.print(table)
    out.print(f"base vector: {tables.quoted('arr[i] [/b]')}")
    text = out.export_text()
    assert "def f(arr, i): return arr[i] + x[/b] [red]" in text and "base vector: 'arr[i] [/b]'" in text


def test_an_empty_completion_reads_no_text_not_an_empty_cell(monkeypatch):
    """A vector that makes the model end at once (SmolLM2's discovery has one) shows "(no text)" in every table; a
    completion never recorded (None) shows "—"."""
    import io

    from rich.console import Console

    from melbo.output import tables

    out = Console(width=120, file=io.StringIO(), record=True)
    table = tables.make_table("t", (("#", "right"), ("completion", "left")))
    for i, text in enumerate(("", " \n ", None, "[no text]")):
        table.add_row(str(i), tables.short(text))
    out.print(table)
    rows = [line for line in out.export_text().splitlines() if line.startswith("│")]
    assert [row.count("(no text)") for row in rows] == [1, 1, 0, 0] and "—" in rows[2] and "[no text]" in rows[3]
    for in_log, (plain, steered) in ((True, ("Sure.", "")), (False, ("Sure.", "")), (True, ("", "Sure."))):  # melbo generate
        monkeypatch.setattr(tables, "to_log", lambda _console, in_log=in_log: in_log)  # lines in a log, a table in a terminal
        shown = Console(width=120, file=io.StringIO(), record=True)
        for item in tables.side_by_side("t", plain, steered):
            shown.print(item)
        text = shown.export_text()
        assert "(no text)" in text and "Sure." in text


def test_the_study_table_shows_unit_names_as_written():
    """A unit's name comes from the study file: `[bold]` in it is text in the terminal's live table, not markup."""
    import io

    from rich.console import Console

    from melbo.output.live import StudyView

    out = Console(width=120, file=io.StringIO(), record=True)
    out.print(StudyView(["radius=[bold]20", ""])._table())
    text = out.export_text()
    assert "radius=[bold]20" in text and "(the study)" in text


def test_a_table_narrower_than_its_title_gets_the_title_as_one_line_above_it():
    """`melbo probe`'s table is 36 columns wide and its title 85: rich centred the title over three lines; now it is
    one line above the table, and a wide table keeps its title."""
    import io

    from rich.console import Console

    from melbo.output import tables

    out = Console(width=200, file=io.StringIO(), record=True)
    title = "Presence after layer 8 over 226 generated tokens (|cos|; z against random directions)"
    narrow = tables.make_table(title, (("#", "right"), ("z", "right")))
    narrow.add_row("0", "+1.6")
    wide = tables.make_table("short title", (("#", "right"), ("completion", "left")))
    wide.add_row("0", "x" * 60)
    tables.show([narrow, wide], out)
    lines = out.export_text().splitlines()
    assert lines[0] == title and lines[1].startswith("┏")
    assert "short title" in lines[6] and lines[7].startswith("┏")
