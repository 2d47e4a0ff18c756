"""What reaches a driver's console: the project's lines; Ray's own lines go to Ray's log folder.

Two of Ray's channels reach a driver's console whatever ``log_to_driver`` says: the raylet's messages to
drivers (e.g. "N PYTHON worker processes have been started"), which Ray's error listener prints, and the
C++ core worker's own log, which writes its error lines to file descriptor 2 as well as to its file in
the session's log folder (e.g. ray#53727's line about actor constructor arguments, at every Ray Data
actor pool). ``ray_lines_to_its_logs`` sends both to one file in that folder, ``driver-console-<pid>.log``.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys

# The loggers whose INFO lines are ours to show; every other library shows warnings and errors only.
OUR_LOGGERS = ("__main__", "core", "ops", "pipelines", "tune", "bench")
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"

_diverted_to: str | None = None  # the file, once this process's Ray lines go there


def console_logging() -> None:
    """The entry scripts' logging: our INFO lines, other libraries' warnings and errors (matplotlib's
    font cache notice, for one, is not the user's business)."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


def ray_lines_to_its_logs(logs_dir: str | None) -> str | None:
    """Sends Ray's console lines to ``driver-console-<pid>.log`` in ``logs_dir`` (the session's log folder).

    Once per process; call after ``ray.init``. File descriptor 2 moves only where ``sys.stderr`` is the
    process's own (a script, a submitted job), not under pytest's capture or in a notebook; Python's
    ``sys.stderr`` then writes to a copy of the console's descriptor, so tracebacks and warnings stay
    on the console.

    Returns:
        The file, or None when ``logs_dir`` is unknown.
    """
    global _diverted_to
    if _diverted_to is not None or logs_dir is None:
        return _diverted_to
    path = os.path.join(logs_dir, f"driver-console-{os.getpid()}.log")
    _raylet_messages_to(path)
    if sys.stderr is sys.__stderr__ and _fileno(sys.stderr) == 2:
        _native_stderr_to(path)
    _diverted_to = path
    return path


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _raylet_messages_to(path: str) -> None:
    # Ray's error listener thread looks this function up at each message; with log_to_driver=False
    # (connect_ray) nothing else calls it. A private name: where another Ray lacks it, nothing changes.
    import ray._private.worker as ray_worker

    if not hasattr(ray_worker, "print_to_stdstream"):
        return

    def to_file(data: dict, ignore_prefix: bool) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(f"({data.get('pid', 'ray')}) {line}\n" for line in data.get("lines", []))

    ray_worker.print_to_stdstream = to_file


def _native_stderr_to(path: str) -> None:
    old = sys.stderr
    old.flush()
    console = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    new = open(console, "w", buffering=1, encoding=old.encoding, errors=old.errors)  # noqa: SIM115 - the process's stderr
    sys.stderr = new
    # Handlers made before now (ours, Ray's) hold the old stream, which writes to descriptor 2.
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if isinstance(handler, logging.StreamHandler) and handler.stream is old:
                handler.setStream(new)
    if faulthandler.is_enabled():
        faulthandler.enable(new)
