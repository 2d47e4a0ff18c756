"""What a person reads when a run fails: the first failed worker's cause in one line, not Ray's wrapping."""

from __future__ import annotations

import re

from pipelines.data.coco import BadInputError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_BAD_INPUT_LINE = re.compile(r"^(?:[\w.]*\.)?BadInputError: (.+)$", re.MULTILINE)
# "ValueError: ...", "pipelines.x.SomeError: ...", not indented traceback lines or Ray's "ray::Actor.method()".
_ERROR_LINE = re.compile(r"^((?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt)\b.*)$", re.MULTILINE)


def _bad_input_in(error: BaseException | None, depth: int = 0) -> BadInputError | None:
    """The project's BadInputError inside Ray's wrappers (task error, worker error, cause chain), if any."""
    if error is None or depth > 8:
        return None
    if isinstance(error, BadInputError):
        return error
    for inner in (getattr(error, "cause", None), error.__cause__, error.__context__):
        if isinstance(inner, BaseException):
            found = _bad_input_in(inner, depth + 1)
            if found is not None:
                return found
    return None


def describe_failure(error: BaseException) -> str:
    """The cause of a failed ``fit()``: the first failed worker's error, without Ray's wrapping and traceback.

    Bad input found inside a Ray Data task (an undecodable image) comes out as the project's own line:
    file, image id, cause and the ``data.on_bad_input=skip`` hint.
    """
    failures = getattr(error, "worker_failures", None)  # ray.train.WorkerGroupError
    if failures:
        rank, cause = min(failures.items(), key=lambda kv: kv[0])
        where = f"worker {rank}" + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else "")
    else:
        cause, where = getattr(error, "controller_failure", None) or error, None
    bad = _bad_input_in(cause)
    if bad is not None:
        return f"bad input: {str(bad).strip().splitlines()[0]}"
    text = _ANSI.sub("", str(cause)).strip()
    # A remote error's text holds the remote traceback; the project's own line is the one to show.
    found = _BAD_INPUT_LINE.findall(text)
    if found:
        return f"bad input: {found[-1].strip()}"
    if "\n" in text:  # Ray's wrapping: the innermost "SomeError: message" line says what happened
        causes = _ERROR_LINE.findall(text)
        text = causes[-1].strip() if causes else text.splitlines()[0].strip()
    elif not text.startswith(type(cause).__name__):
        text = f"{type(cause).__name__}: {text}" if text else type(cause).__name__
    return f"{where}: {text}" if where else text
