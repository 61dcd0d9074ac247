"""The one exception type a user can cause.

Every mistake a user can make (a wrong layer, a missing file, a corrupt vector file...) raises
:class:`MelboError` with a message that says what is wrong and what to do. The CLI prints it as one line
and exits with status 2; the Python API lets it propagate.
"""

from __future__ import annotations


class MelboError(Exception):
    """A problem with the user's input, explained in one line."""
