"""What a person reads when a run fails: the first failed worker's cause in one line, not Ray's wrapping."""

from __future__ import annotations


def describe_failure(error: BaseException) -> str:
    """The cause of a failed ``fit()``: the first failed worker's error, without Ray's wrapping and traceback."""
    failures = getattr(error, "worker_failures", None)  # ray.train.WorkerGroupError
    if failures:
        rank, cause = min(failures.items(), key=lambda kv: kv[0])
        where = f"worker {rank}" + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else "")
    else:
        cause, where = getattr(error, "controller_failure", None) or error, None
    text = str(cause).strip()
    if "Traceback (most recent call last)" in text:  # a remote error (a Ray Data task's): "Type: message" last
        text = text.splitlines()[-1].strip()
    elif not text.startswith(type(cause).__name__):
        text = f"{type(cause).__name__}: {text}" if text else type(cause).__name__
    return f"{where}: {text}" if where else text
