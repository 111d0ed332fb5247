"""The one exception type whose message reaches the user as a one-line error."""

from __future__ import annotations

import sys
from pathlib import Path


class SiamdiffError(Exception):
    """A problem with the user's input or environment, phrased for the user.

    The CLI prints ``siamdiff: error: <message>`` and exits with status 2, so the
    message must be one line and name the file (or setting) at fault.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        text = " ".join(message.split())  # one line; a path keeps its spaces as they are
        if path is not None:
            where = str(path).replace("\n", "\\n").replace("\r", "\\r")
            text = f"{where}: {text}"
        super().__init__(text)


def first_line(exc: BaseException) -> str:
    """An exception's first line (or its type's name when it has no text): libraries raise
    multi-line messages, and the user gets one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def out_of_memory_error(
    exc: BaseException, advice: str, path: str | Path | None = None
) -> SiamdiffError:
    """torch's multi-paragraph out-of-memory message cut to its first two sentences (what ran
    out, how much was asked for), followed by what the user can change."""
    cause = ". ".join(str(exc).split(". ")[:2]).rstrip(".")
    return SiamdiffError(f"{cause}: {advice}", path)


def compile_failure(exc: BaseException) -> SiamdiffError | None:
    """A failure of torch.compile's backend (inductor: a compiler missing, a damaged compile
    cache) as one line saying what to do; None for any other exception, errors of the
    compiled code itself included (a shape bug keeps its traceback)."""
    dynamo = sys.modules.get("torch._dynamo.exc")  # never imported: nothing was compiled
    if dynamo is None or not isinstance(exc, dynamo.BackendCompilerFailed):
        return None
    cause = first_line(exc).removeprefix(f"{type(exc).__name__}: ")
    return SiamdiffError(
        f"torch.compile failed ({cause}): leave out the compile speed lever, or give it an "
        "empty cache with TORCHINDUCTOR_CACHE_DIR=/a/new/folder (runs sharing one cache can "
        "damage it)"
    )
