"""``melbo report``: one self-contained HTML page per run folder, plus its plots as PNG files.

>>> from melbo.report import write_report
>>> write_report("runs/ortho")          # doctest: +SKIP
PosixPath('runs/ortho/report.html')

The page is built in three steps, each its own module: :mod:`~melbo.report.data` gathers what the run
folder holds, :mod:`~melbo.report.plots` draws the figures, :mod:`~melbo.report.render` writes the HTML.
"""

from __future__ import annotations

import functools
from pathlib import Path

from melbo.errors import MelboError
from melbo.files.io import atomic_write, write_bytes
from melbo.files.runs import PLOTS_FOLDER, REPORT_FILE
from melbo.report.data import ReportData, gather
from melbo.report.plots import draw_all
from melbo.report.render import render

__all__ = ["REPORT_FILE", "ReportData", "gather", "write_report"]


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write ``RUN/report.html`` (or ``out``) and ``RUN/plots/*.png``; returns the page's path."""
    run = Path(run)
    if out is not None and Path(out).is_dir():
        raise MelboError(f"--out {out} is a folder: give the file to write, e.g. {Path(out) / 'report.html'}")
    data = gather(run)
    plots = draw_all(data)
    published = {name: (run / name).read_bytes() for name in data.published_plots}
    page = render(data, plots, published)
    target = Path(out) if out else run / REPORT_FILE
    try:
        for plot in plots:
            if plot.png is not None:
                png = plot.png
                atomic_write(run / PLOTS_FOLDER / f"{plot.name}.png", functools.partial(write_bytes, png))
        atomic_write(target, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    except OSError as exc:
        raise MelboError(f"cannot write the report to {target}: {exc.strerror or exc}") from exc
    return target
