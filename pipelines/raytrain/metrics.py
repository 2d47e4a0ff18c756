"""The metrics channel, in three stages named for what they are.

1. ``StepReporter`` (rank 0 of the workers): turns each optimizer step's record into ``metrics.jsonl``
   lines (averaged over ``train.metrics_every_steps``) and progress records, and sends them in small
   batches, every ``train.log_every_s``, to
2. ``MetricsSink`` (a zero-CPU actor): buffers them until the driver drains them, so the workers never
   wait on the driver's disk or console; and
3. ``MetricsPump`` (a thread on the driver): drains the sink every second, appends to ``metrics.jsonl``
   in the run directory, hands the records to the experiment trackers (``tracking.Trackers``) and prints
   ``format_record``'s line for each record. Where no step comes within ``train.first_step_timeout_s``
   while Ray holds demands it cannot place, it says once what is pending (``cluster.pending_demands``).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, TextIO

import ray

from core.evaluation import format_ap_table
from pipelines.engine import peak_memory_mb
from pipelines.job_config import TrainConfig
from pipelines.raytrain.cluster import pending_demands
from pipelines.raytrain.run_dir import RunDir
from pipelines.raytrain.tracking import Trackers
from pipelines.raytrain.worker_context import WorkerContext

log = logging.getLogger(__name__)

# The ETA comes from the mean step time after a warm-up (allocations, Ray Data's first blocks: the demo's
# first steps take 10-100x a steady one), once a few steady steps were timed.
ETA_WARMUP_STEPS = 5
ETA_MIN_STEPS = 5
# Records that show the workers took steps (or finished an epoch's evaluation) on the driver's side.
STEP_KINDS = ("progress", "epoch", "eval", "eval_progress")
PENDING_POLL_S = 10.0  # past the first-step timeout, how often Ray's pending demands are read


class StepReporter:
    """Stage 1, on rank 0: step records averaged into metrics lines and sent to the sink every log_every_s."""

    def __init__(self, sink, train: TrainConfig, ctx: WorkerContext, steps_per_epoch: int) -> None:
        self.sink = sink  # None on the other ranks: every call is then a no-op
        self.train = train
        self.world_size = ctx.world_size
        self.steps_per_epoch = steps_per_epoch
        self.device = ctx.device
        self.buffer: list[dict[str, Any]] = []
        self.pending: list[dict[str, Any]] = []  # step records not yet averaged into one line
        self.pending_at = (0, 0)  # (epoch, global_step) of the last pending record
        self.last_flush = time.monotonic()
        self.window_images = 0
        self.window_time = 0.0
        self.steps_seen = 0
        self.steady_s = 0.0  # time of the steps after the warm-up, and their number
        self.steady_steps = 0

    def send(self, records: list[dict[str, Any]]) -> None:
        if self.sink is not None:
            self.sink.log.remote(records)

    def event(self, event: str, epoch: int, global_step: int, **extra: Any) -> None:
        """The run (re)started ("start" or "resume" at ``epoch``), or a mid-epoch "checkpoint" in ``epoch``.

        ``extra``: ``epoch_step`` (steps done in the epoch), ``reason`` of a checkpoint. The steps' records
        held back until now go first: a group stopped after a checkpoint then loses none of the steps the
        checkpoint holds, since a resumed run starts after them.
        """
        self.flush()
        record = {
            "kind": "event",
            "time": time.time(),
            "event": event,
            "epoch": epoch,
            "global_step": global_step,
            **extra,
        }
        self.send([{**record, "world_size": self.world_size, "device": str(self.device)}])

    def on_step(self, record: dict[str, Any], epoch: int, global_step: int) -> None:
        """One optimizer step's record from ``train_one_epoch``, at ``global_step`` of the run."""
        if self.sink is None:
            return
        step_s = record["step_time_s"]
        self.steps_seen += 1
        if self.steps_seen > ETA_WARMUP_STEPS:
            self.steady_s += step_s
            self.steady_steps += 1
        self.window_images += record["step_images"] * self.world_size
        self.window_time += step_s
        self.pending.append(record)
        self.pending_at = (epoch, global_step)
        last_of_epoch = record["step"] == self.steps_per_epoch
        if len(self.pending) >= self.train.metrics_every_steps or last_of_epoch:
            self.buffer.append(self._line(self.pending, epoch, global_step))
            self.pending = []
        now = time.monotonic()
        if now - self.last_flush >= self.train.log_every_s or last_of_epoch:
            remaining = (self.train.epochs - epoch) * self.steps_per_epoch - record["step"]
            progress = {
                "kind": "progress",
                "time": time.time(),
                "epoch": epoch,
                "epochs": self.train.epochs,
                "step": record["step"],
                "steps_per_epoch": self.steps_per_epoch,
                "global_step": global_step,
                "loss": record["loss"],
                "lr": record["lr"],
                "images_per_s": self.window_images / max(self.window_time, 1e-9),
                "eta_s": self.eta_s(remaining),
            }
            self.send(self.buffer + [progress])
            self.buffer = []
            self.last_flush = now
            self.window_images, self.window_time = 0, 0.0

    def eta_s(self, remaining_steps: int) -> float | None:
        """Seconds left at the steady rate; None until ETA_MIN_STEPS steps after the warm-up were timed."""
        if self.steady_steps < ETA_MIN_STEPS:
            return None
        return remaining_steps * self.steady_s / self.steady_steps

    def warn(self, message: str) -> None:
        """A warning for the person running the job (one the user can act on), printed by the driver."""
        self.send([{"kind": "warning", "time": time.time(), "message": message}])

    def eval_progress(self, images_done: int, num_val: int) -> None:
        """Rank 0's images evaluated so far (x world size: an estimate of the whole), every log_every_s."""
        now = time.monotonic()
        if self.sink is None or now - self.last_flush < self.train.log_every_s:
            return
        self.last_flush = now
        total = min(images_done * self.world_size, num_val) if num_val else images_done * self.world_size
        self.send([{"kind": "eval_progress", "time": time.time(), "images": total, "num_val": num_val}])

    def send_eval(self, ap: dict[str, float], epoch: int, global_step: int, vis: list[dict[str, Any]]) -> None:
        """The validation AP of ``epoch`` and the images drawn for it."""
        self.send([{"kind": "eval", "time": time.time(), "epoch": epoch, "global_step": global_step, **ap}])
        if vis and self.sink is not None:
            self.sink.log_vis.remote(vis)

    def send_epoch(self, metrics: dict[str, Any], drawn_epochs: set[int]) -> None:
        """The epoch's report; data_epochs: the epochs rank 0's augmentation was drawn for (its own, or a bug).

        Waits until the sink holds it: the epoch's ``ray.train.report`` follows, and ``RecordsWritten``
        holds that report back until the driver has written the record.
        """
        if self.sink is not None:
            record = {"kind": "epoch", "time": time.time(), **metrics, "data_epochs": sorted(drawn_epochs)}
            ray.get(self.sink.log.remote([record]))

    def _line(self, records: list[dict[str, Any]], epoch: int, global_step: int) -> dict[str, Any]:
        """One metrics line for the last len(records) steps: numbers averaged, lr and counters as of the last."""
        last = records[-1]
        line = {"kind": "step", "time": time.time(), "epoch": epoch, "global_step": global_step, **last}
        if len(records) > 1:
            for key in last:
                if key.startswith("loss") or key in ("class_error", "cardinality_error", "grad_norm"):
                    values = [r[key] for r in records if r.get(key) is not None]
                    line[key] = sum(values) / len(values) if values else None
            line["steps_averaged"] = len(records)
        seconds = sum(r["step_time_s"] for r in records)
        line["step_images"] = sum(r["step_images"] for r in records)
        line["step_time_s"] = seconds / len(records)
        line["images_per_s"] = line["step_images"] * self.world_size / max(seconds, 1e-9)
        line["max_mem_mb"] = peak_memory_mb(self.device)
        return line

    def flush(self) -> None:
        if self.pending:  # an epoch that ended short of steps_per_epoch
            self.buffer.append(self._line(self.pending, *self.pending_at))
            self.pending = []
        if self.buffer:
            self.send(self.buffer)
            self.buffer = []


@ray.remote(num_cpus=0)
class MetricsSink:
    """Stage 2, an actor: buffers the records the workers send until the driver drains them."""

    def __init__(self) -> None:
        self._records: list[dict[str, Any]] = []
        self._vis: list[dict[str, Any]] = []
        # Records logged, drained, and written by the driver (``written``): counts since the start.
        self._logged = self._drained = self._written = 0

    def log(self, records: list[dict[str, Any]]) -> None:
        self._records.extend(records)
        self._logged += len(records)

    def log_vis(self, vis: list[dict[str, Any]]) -> None:
        self._vis = list(vis)

    def drain(self) -> list[dict[str, Any]]:
        out, self._records = self._records, []
        self._drained = self._logged
        return out

    def written(self) -> None:
        """The driver wrote every record of its last ``drain``."""
        self._written = self._drained

    def counts(self) -> tuple[int, int]:
        """(records logged, records the driver has written), since the start."""
        return self._logged, self._written

    def vis(self) -> list[dict[str, Any]]:
        return self._vis


class MetricsPump:
    """Stage 3, on the driver: drains the sink every second on a thread into metrics.jsonl and the console."""

    def __init__(
        self,
        sink,
        run_dir: RunDir | None,
        out: TextIO | None = sys.stdout,
        trackers: Trackers | None = None,
        first_step_timeout_s: float = 0.0,
    ) -> None:
        """``first_step_timeout_s``: 0 never looks for pending demands (an evaluation, a test)."""
        self.sink, self.run_dir, self.out, self.trackers = sink, run_dir, out, trackers
        self.stop = threading.Event()
        self.last_eval: dict[str, Any] | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True, name="metrics-pump")
        self.first_step_timeout_s = first_step_timeout_s
        self.started = time.monotonic()
        self.stepped = False
        self.pending_said = False
        self.next_pending_check = self.started + first_step_timeout_s

    def __enter__(self) -> MetricsPump:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        self.drain()

    def _loop(self) -> None:
        while not self.stop.wait(1.0):
            try:
                self.drain()
                self.say_what_is_pending()
            except Exception as e:  # never let logging kill the run
                log.warning("metrics pump: %s", e)

    def say_what_is_pending(self) -> None:
        """Past the first-step timeout with no step, one warning with Ray's pending demands, if it has any."""
        now = time.monotonic()
        if self.stepped or self.pending_said or not self.first_step_timeout_s or now < self.next_pending_check:
            return
        self.next_pending_check = now + PENDING_POLL_S
        pending = pending_demands()
        if pending is None:  # slow, not stuck: nothing waits for resources
            return
        self.pending_said = True
        message = (
            f"no training step in {now - self.started:.0f} s while Ray waits for resources: {pending}. Give the run more CPUs/GPUs, or ask for fewer (train.num_workers, "
            f"train.cpus_per_worker, data.num_decode_workers); train.first_step_timeout_s sets this wait"
        )
        if self.out is None:
            log.warning("%s", message)
        else:
            print(f"warning: {message}", file=self.out, flush=True)

    def drain(self) -> None:
        records = ray.get(self.sink.drain.remote())
        self._write(records)
        self.sink.written.remote()

    def _write(self, records: list[dict[str, Any]]) -> None:
        self.stepped = self.stepped or any(r.get("kind") in STEP_KINDS for r in records)
        if self.trackers is not None:  # before the sync, which then carries their files too
            self.trackers.log(records)
        if self.run_dir is not None:  # None: an evaluation, whose outputs are written at the end
            self.run_dir.append_metrics([r for r in records if r.get("kind") not in ("progress", "eval_progress")])
            if any(r.get("kind") == "epoch" for r in records):
                self.run_dir.sync()  # a bucket run's metrics reach the bucket every epoch, not only at the end
        for r in records:
            try:
                line = self.format(r)
            except (KeyError, TypeError, ValueError) as e:  # a record this printer does not know
                log.debug("unprintable record %s: %s", r, e)
                continue
            if line and self.out is not None:  # out=None: quiet (a Tune trial's run)
                print(line, file=self.out, flush=True)

    def format(self, r: dict[str, Any]) -> str | None:
        if r.get("kind") == "eval":
            self.last_eval = r
        return format_record(r)


class RecordsWritten(ray.train.UserCallback):
    """Holds each report back from the callbacks after it until the driver has written the records the
    sink held when the report came.

    For runs whose reports go on to someone who may stop the run at once (a Tune trial's scheduler):
    without it the trial's process can end before its pump drains the epoch's records, and its
    ``metrics.jsonl`` and trackers never see that epoch. Waits at most ``timeout_s``.
    """

    def __init__(self, sink, timeout_s: float = 30.0) -> None:
        self.sink = sink
        self.timeout_s = timeout_s

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        # Only the records logged before now: the workers go on logging while this waits.
        deadline = time.monotonic() + self.timeout_s
        logged, written = self._counts()
        while written < logged and time.monotonic() < deadline:
            time.sleep(0.1)
            _, written = self._counts()

    def _counts(self) -> tuple[int, int]:
        # Runs on Train's controller, an asyncio actor: a future's result, not ray.get (which warns there).
        return self.sink.counts.remote().future().result(timeout=self.timeout_s)


def format_record(r: dict[str, Any]) -> str | None:
    """The console line of one record, or None for records that only go to metrics.jsonl (steps)."""
    kind = r.get("kind")
    if kind == "progress":
        return format_progress(r)
    if kind == "epoch":
        return (
            f"epoch {r['epoch'] + 1} done: loss {r['loss']:.4f}  {r['images_per_s']:.1f} img/s  "
            f"{r['epoch_time_s']:.0f} s  peak mem {r['max_mem_mb']:.0f} MiB"
        )
    if kind == "eval":
        if "epoch" not in r:  # an evaluation alone: its entry script prints the table
            return f"evaluated {r['num_eval_images']} images in {r['eval_time_s']:.0f} s"
        return (
            f"eval after epoch {r['epoch'] + 1} ({r['num_eval_images']} images, {r['eval_time_s']:.0f} s):\n"
            + format_ap_table(r)
        )
    if kind == "eval_progress":
        of = f"/{r['num_val']}" if r.get("num_val") else ""
        return f"evaluating: about {r['images']}{of} images done"
    if kind == "warning":
        return f"warning: {r['message']}"
    if kind == "event":
        if r["event"] == "resume" and r.get("epoch_step"):
            return f"resuming in epoch {r['epoch'] + 1} after step {r['epoch_step']} (global step {r['global_step']})"
        if r["event"] == "resume":
            return f"resuming from the checkpoint of epoch {r['epoch']} (global step {r['global_step']})"
        if r["event"] == "checkpoint":
            why = " (preemption notice)" if r.get("reason") == "preemption" else ""
            return f"checkpoint in epoch {r['epoch'] + 1} after step {r['epoch_step']}{why}"
        return f"training on {r['world_size']} workers ({r['device']})"
    return None


def format_duration(seconds: float) -> str:
    """``H:MM:SS``, with the days in front past one (a 50-epoch COCO run takes days): ``3d 01:00:00``."""
    days, rest = divmod(int(max(0.0, seconds)), 86400)
    text = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


def format_progress(r: dict[str, Any]) -> str:
    """One progress line: epoch, step/total, loss, images/s, and the ETA once enough steps were timed."""
    eta = r.get("eta_s")
    eta_txt = "" if eta is None else f"  ETA {format_duration(eta)}"
    return (
        f"epoch {r['epoch'] + 1}/{r['epochs']}  step {r['step']}/{r['steps_per_epoch']}  "
        f"loss {r['loss']:.4f}  lr {r['lr']:.2e}  {r['images_per_s']:.1f} img/s{eta_txt}"
    )
