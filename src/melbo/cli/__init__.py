"""The ``melbo`` command: a thin layer over the Python API. It parses options, calls the API, prints.

Errors a user can cause (:class:`melbo.MelboError`) print as one line on stderr with exit status 2;
``--debug`` shows the traceback instead. Commands live in one module per area: ``runs`` (info, generate,
discover, ortho), ``analysis`` (eval, compose, probe, report), ``files`` (export, import), ``study`` (study, demo), ``serve`` (serve).
"""

from __future__ import annotations

import sys

from typer.exceptions import Abort, Exit, TyperException  # typer vendors click (≥ 0.26); these moved until 0.27.2

# Each command module registers its commands on the app (`melbo --help` lists them in app.HELP_ORDER).
from melbo.cli import (
    analysis,  # noqa: F401
    files,  # noqa: F401
    runs,  # noqa: F401
    serve,  # noqa: F401
    study,  # noqa: F401
)
from melbo.cli.app import app, debug, fail
from melbo.errors import MelboError
from melbo.output.live import err_console

OPTIONAL_VALUES = {"--ray": "local"}  # options whose value may be left out: `melbo study S.toml --ray [ADDRESS]`


def with_optional_values(args: list[str]) -> list[str]:
    """``--ray`` with no value (last, or followed by another option) gets its default value written in."""
    out = []
    for k, arg in enumerate(args):
        out.append(arg)
        following = args[k + 1] if k + 1 < len(args) else None
        if arg in OPTIONAL_VALUES and (following is None or following.startswith("-")):
            out.append(OPTIONAL_VALUES[arg])
    return out


EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "starlette": "serve", "ray": "ray"}  # module → melbo's extra that brings it


def main() -> None:
    """Entry point of the ``melbo`` console script."""
    try:
        code = app(args=with_optional_values(sys.argv[1:]), prog_name="melbo", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except Exit as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except (Abort, KeyboardInterrupt):
        err_console.print("melbo: interrupted")
        sys.exit(130)
    except MelboError as exc:
        if debug["on"]:
            raise
        fail(str(exc))
    except ModuleNotFoundError as exc:  # an optional extra that is not installed: say which, in one line
        extra = EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None or debug["on"]:
            raise
        fail(f"this command needs {exc.name}, which is not installed: pip install 'melbo[{extra}]'")
    except OSError as exc:  # a path given that cannot be written or read (no such folder, no permission, disk full)
        if exc.filename is None or debug["on"]:
            raise
        fail(f"{exc.filename}: {exc.strerror or exc}")
    except TyperException as exc:  # a malformed command line: one line, like every other user error
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `melbo` or `melbo ortho`: show the help
            app(prog_name="melbo", args=[*sys.argv[1:], "--help"])
        if debug["on"]:
            raise
        context = getattr(exc, "ctx", None)
        command = f"melbo {context.info_name} --help" if context is not None and context.info_name != "melbo" else "melbo --help"
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        fail(f"{message} (see {command})")


__all__ = ["app", "main"]
