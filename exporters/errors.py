"""The one exception the exporters raise for anything the caller can fix."""

from __future__ import annotations


class ExportError(RuntimeError):
    """A one-line message that names the problem and the fix (the CLI prints it as is)."""

    def __init__(self, message: str):
        message = " ".join(str(message).split())  # always one line
        super().__init__(message)
