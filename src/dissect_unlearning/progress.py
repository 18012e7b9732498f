"""Long stages in worker processes: shown while they run, stopped when asked, never left running on their own.

A stage of the build (precompute's tasks, the chapters) runs as jobs in a few worker processes (`run_jobs`). The code
a job runs says where it is with `stage()` and `detail()`, wherever it is (they do nothing outside a worker), and
the parent shows it: jobs done / total, what each worker does, the time elapsed and an estimate of the time left,
as one status line on a terminal (a block every 30 s when stdout is not one) and in a log file.

Stopping: Ctrl-C or SIGTERM (or SIGHUP) to the parent ends every worker within seconds. The parent sends SIGTERM to
the workers and whatever they started (a papermill kernel); in a worker that raises `Stopped`, a KeyboardInterrupt,
so the job's code cleans up as it does for Ctrl-C (atomic cache folders remove themselves, a training run saves its
checkpoint). Whatever still runs after STOP_GRACE seconds is killed, and the temporary cache folders of the killed
are removed (cache.parse_temp_name says whose they are). A worker also dies with its parent when that is killed
outright (Linux PR_SET_PDEATHSIG), so no worker is ever left computing for nobody.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from . import cache

STATUS_EVERY = 30.0  # seconds between status blocks in the log, and on a stdout that is not a terminal
REDRAW_EVERY = 1.0  # seconds between redraws of the status line on a terminal
STOP_GRACE = 10.0  # seconds the workers get to clean up after SIGTERM before they are killed
PREFIX = "[book]"


class Stopped(KeyboardInterrupt):
    """The process was asked to stop by a signal other than Ctrl-C's SIGINT (SIGTERM, SIGHUP). A KeyboardInterrupt,
    so that everything that cleans up after Ctrl-C cleans up after it too."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(int(signum))
        self.signum = int(signum)

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}"


def stop_reason(exc: BaseException) -> str:
    """'SIGTERM', 'Ctrl-C (SIGINT)' for a plain KeyboardInterrupt, else the error that stopped the run."""
    if isinstance(exc, Stopped):
        return signal.Signals(exc.signum).name
    if isinstance(exc, KeyboardInterrupt):
        return "Ctrl-C (SIGINT)"
    return f"an error in the parent ({type(exc).__name__}: {exc})"


def _raise_stopped(signum, frame):
    # Once: a process that is already stopping (saving a checkpoint, removing a folder) is left to finish; the
    # parent kills it if it takes too long.
    signal.signal(signum, signal.SIG_IGN)
    raise Stopped(signum)


_STOP_SIGNALS = ("SIGTERM", "SIGHUP")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside the block, SIGTERM and SIGHUP raise Stopped in the main thread (as Ctrl-C raises KeyboardInterrupt)
    instead of ending the process on the spot, so that `finally` blocks run and nothing is left half-written. Only
    where the signal still has its default action (a handler someone installed, or an ignored signal, stays) and only
    in the main thread (the only one that receives Python signal handlers); nests."""
    installed = {}
    if threading.current_thread() is threading.main_thread():
        for name in _STOP_SIGNALS:
            signum = getattr(signal, name, None)
            if signum is not None and signal.getsignal(signum) == signal.SIG_DFL:
                installed[signum] = signal.signal(signum, _raise_stopped)
    try:
        yield
    finally:
        for signum, before in installed.items():
            signal.signal(signum, before)


# --------------------------------------------------------------------------------------------------------------------
# In a worker: saying where the job is
# --------------------------------------------------------------------------------------------------------------------
_TO_PARENT = None  # in a worker: the connection to the parent
_SEND_LOCK = threading.Lock()  # a connection is not safe for two threads sending at once
_last_detail = ""


def _send(message: tuple) -> None:
    if _TO_PARENT is None:
        return
    # Reporting must never break the job: a parent that is gone takes the worker down itself (PDEATHSIG).
    with _SEND_LOCK, contextlib.suppress(OSError, ValueError):
        _TO_PARENT.send(message)


def in_worker() -> bool:
    """Whether this process is a worker of run_jobs (its lines would garble the parent's status line)."""
    return _TO_PARENT is not None


def stage(text: str, done: float | None = None) -> None:
    """Say which stage of its job this process is at ("sweep 3/6"). `done`: the fraction of the job's estimated
    work finished before this stage, for the estimate of the time left. Does nothing outside a worker."""
    global _last_detail
    _last_detail = ""  # a new stage starts without detail
    _send(("stage", text, done))


def detail(text: str) -> None:
    """Say where in the current stage this process is ("step 3/5"). Does nothing outside a worker, nor when the
    text is the one last said (a loop may call it on every pass)."""
    global _last_detail
    if _TO_PARENT is None or text == _last_detail:
        return
    _last_detail = text
    _send(("detail", text))


def die_with_parent(parent_pid: int) -> None:
    """Ask the system to send this process SIGTERM when its parent ends, even by SIGKILL (Linux; elsewhere the
    parent's own stop ends its workers), and end now if the parent is already gone."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before the request was in place: no signal will come
        os._exit(1)


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling (to reach the parent), else a RuntimeError saying what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any pickling problem gets the same answer
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _worker_main(wid: int, parent_pid: int, inbox, outbox) -> None:
    global _TO_PARENT
    die_with_parent(parent_pid)
    signal.signal(signal.SIGTERM, _raise_stopped)
    # A terminal's Ctrl-C (and hang-up) goes to the whole process group; the parent gets it too, and stops the
    # workers in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _TO_PARENT = outbox
    try:
        while True:
            try:
                item = inbox.recv()
            except EOFError:  # the parent closed its end: nothing more to do
                return
            if item is None:
                return
            index, fn, args = item
            _send(("started", index))
            try:
                result = fn(*args)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - the parent reports it with the job's name
                _send(("failed", index, _portable(exc), traceback.format_exc()))
            else:
                _send(("done", index, result))
    except KeyboardInterrupt:
        pass  # stopped: the job's code has cleaned up on the way here, and the parent says so


# --------------------------------------------------------------------------------------------------------------------
# In the parent: running the jobs
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    label: str  # "smollm2-135m / Harry Potter / dpo", "04_patching"
    fn: Callable  # a module-level function (it is pickled to the worker)
    args: tuple = ()
    estimate: float | None = None  # seconds of work, only to estimate the time left


@dataclass
class Outcome:
    job: Job
    result: object = None
    error: BaseException | None = None
    details: str | None = None  # the worker's traceback of `error`
    seconds: float = 0.0
    finished: bool = False


class WorkerDied(RuntimeError):
    """A worker process ended while it ran a job (killed from outside, out of memory, a crash)."""


class _RemoteTraceback(Exception):
    def __init__(self, text: str):
        super().__init__(text)

    def __str__(self) -> str:
        return "\n" + self.args[0]


def raise_with_details(outcome: Outcome) -> None:
    """Raise a failed job's error in the parent, with the worker's traceback as its cause."""
    exc = outcome.error
    if outcome.details:
        exc.__cause__ = _RemoteTraceback(outcome.details)
    raise exc


@dataclass
class _Worker:
    wid: int
    process: object
    inbox: object  # parent's sending end
    outbox: object  # parent's receiving end
    job: int | None = None
    started: float = 0.0
    stage: str = ""
    detail: str = ""
    done: float = 0.0  # fraction of the job's estimate finished
    retiring: bool = False  # told to exit after its job (one job per process): gets no other


def clock(seconds: float) -> str:
    """'42 s', '7 min 42 s', '1 h 05 min'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _about(seconds: float) -> str:
    if seconds < 60:
        return "under 1 min"
    if seconds < 90:
        return "about 1 min"
    if seconds < 5400:
        return f"about {round(seconds / 60)} min"
    return f"about {seconds / 3600:.1f} h"


def descendants(pid: int) -> list[int]:
    """The processes `pid` started, and theirs, from /proc (empty where there is none)."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def memory_of(pid: int) -> tuple[int, int]:
    """(resident, proportional) bytes of one process: RSS, and PSS, which splits the pages processes share (the
    torch libraries every worker maps) among them, so the PSS of several processes adds up to what they use
    together. (0, 0) for a process that is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = dict(line.split(":", 1) for line in f if line[:4] in ("Rss:", "Pss:"))
        return int(fields["Rss"].split()[0]) * 1024, int(fields["Pss"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0, 0


class MemoryWatch:
    """Samples the memory of this process and all it started, every `interval` seconds, in a thread: `peak` is
    the largest total (PSS, bytes) seen, `peak_process` the largest single RSS and what that process was. Where
    /proc has no smaps_rollup (not Linux) the peaks stay 0 and `available` is False."""

    def __init__(self, interval: float = 1.0):
        self.interval, self.peak, self.peak_process, self.peak_name = interval, 0, 0, ""
        self.available = os.path.exists(f"/proc/{os.getpid()}/smaps_rollup")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory watch", daemon=True)

    def sample(self) -> None:
        total = 0
        for pid in [os.getpid(), *descendants(os.getpid())]:
            rss, pss = memory_of(pid)
            total += pss
            if rss > self.peak_process:
                self.peak_process, self.peak_name = rss, _process_name(pid)
        self.peak = max(self.peak, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "MemoryWatch":
        if self.available:
            self.sample()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def summary(self) -> str:
        if not self.available:
            return "peak memory: not measured (no /proc/<pid>/smaps_rollup here)"
        return (f"peak memory {self.peak / 2**30:.1f} GB (this process and all it started, together), the largest "
                f"process {self.peak_process / 2**30:.1f} GB ({self.peak_name})")


def _process_name(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    if b"spawn_main" in b" ".join(cmd):
        return "a worker"
    if any(b"ipykernel" in c for c in cmd):
        return "a chapter's kernel"
    return "the build" if pid == os.getpid() else Path(cmd[0].decode(errors="replace")).name or "?"


def remove_leftovers(pids) -> list[Path]:
    """Remove the temporary cache folders and files written by the processes `pids`, which must be dead; return
    them. A writer killed outright cannot remove its own; the cache's other writers' stay untouched."""
    pids = set(pids)
    root = cache.cache_root()
    removed = []
    if not root.is_dir():
        return removed
    folders = [root] + [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for folder in folders:
        with contextlib.suppress(OSError):
            for path in folder.iterdir():
                parsed = cache.parse_temp_name(path.name)
                if not parsed or parsed[2] not in pids or not cache.writer_gone(parsed[1], parsed[2]):
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                removed.append(path)
    return removed


class _Board:
    """What the parent shows: a status line on a terminal, status blocks elsewhere, and the log file."""

    def __init__(self, name: str, jobs: list[Job], log: Path | None, verbose: bool):
        self.name, self.jobs, self.verbose = name, jobs, verbose
        self.t0 = time.monotonic()
        self.tty = verbose and sys.stdout.isatty()
        self.line_shown = False
        self.next_draw = 0.0
        self.next_block = self.t0 + STATUS_EVERY
        self.log = None
        if log is not None:
            log = Path(log)
            log.parent.mkdir(parents=True, exist_ok=True)
            self.log = open(log, "w", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in close()

    def note(self, text: str) -> None:
        """A line for the log only, with the time."""
        if self.log is not None:
            stamp = time.strftime("%H:%M:%S")
            for line in text.splitlines():
                self.log.write(f"{stamp} {line}\n")

    def _clear(self) -> None:
        if self.line_shown:
            sys.stdout.write("\r\x1b[2K")
            sys.stdout.flush()
            self.line_shown = False

    def say(self, text: str, err: bool = False) -> None:
        """A line for the terminal (stdout, or stderr with `err`) and the log."""
        self.note(text)
        if self.verbose:
            self._clear()
            print(f"{PREFIX} {text}" if not err else text, file=sys.stderr if err else sys.stdout, flush=True)
            self.next_draw = 0.0

    def status(self, outcomes: list[Outcome], workers: list[_Worker], jobs_at_once: int) -> tuple[str, list[str]]:
        """(summary, one line per busy worker)."""
        now = time.monotonic()
        elapsed = now - self.t0
        done = sum(1 for o in outcomes if o.finished)
        summary = f"{self.name}: {done}/{len(outcomes)} done, {clock(elapsed)} elapsed"
        left = self._time_left(outcomes, workers, elapsed, jobs_at_once)
        if left is not None and done < len(outcomes):
            summary += f", {_about(left)} left"
        lines = []
        for w in workers:
            if w.job is None:
                continue
            where = w.stage + (f", {w.detail}" if w.detail else "")
            lines.append(f"worker {w.wid}: {self.jobs[w.job].label}" + (f": {where}" if where else "")
                         + f" ({clock(now - w.started)})")
        return summary, lines

    def _time_left(self, outcomes, workers, elapsed, jobs_at_once) -> float | None:
        if any(j.estimate is None for j in self.jobs):
            return None
        total = sum(j.estimate for j in self.jobs)
        done = sum(o.job.estimate for o in outcomes if o.finished)
        running = {w.job: w for w in workers if w.job is not None}
        done += sum(self.jobs[i].estimate * w.done for i, w in running.items())
        if done <= 0 or elapsed < 1:
            return total / max(1, jobs_at_once)  # nothing measured yet: the estimates as they are
        # The measured speed so far (estimated seconds of work per second, all workers together).
        return max(0.0, total - done) * elapsed / done

    def tick(self, outcomes, workers, jobs_at_once, final: bool = False) -> None:
        """Redraw the status line when due; log a status block (and print it where there is no status line) every
        STATUS_EVERY seconds, and at the end (`final`: to the log only, the caller says it is done)."""
        now = time.monotonic()
        if self.tty and not final and now >= self.next_draw:
            summary, lines = self.status(outcomes, workers, jobs_at_once)
            text = " | ".join([f"{PREFIX} {summary}", *lines])
            width = shutil.get_terminal_size((120, 20)).columns - 1
            sys.stdout.write("\r\x1b[2K" + (text if len(text) <= width else text[:width - 1] + "…"))
            sys.stdout.flush()
            self.line_shown = True
            self.next_draw = now + REDRAW_EVERY
        if final or now >= self.next_block:
            summary, lines = self.status(outcomes, workers, jobs_at_once)
            block = "\n".join([summary, *(f"  {line}" for line in lines)])
            self.note(block)
            if self.verbose and not self.tty and not final:
                print("\n".join(f"{PREFIX} {line}" for line in block.splitlines()), flush=True)
            self.next_block = now + STATUS_EVERY

    def close(self) -> None:
        self._clear()
        if self.log is not None:
            self.log.close()
            self.log = None


class _Run:
    def __init__(self, jobs: list[Job], workers: int, board: _Board, on_result, stop_on_error: bool,
                 fresh: bool = False):
        import multiprocessing

        self.fresh = fresh
        self.jobs, self.n_workers, self.board = jobs, workers, board
        self.on_result, self.stop_on_error = on_result, stop_on_error
        self.ctx = multiprocessing.get_context("spawn")
        self.outcomes = [Outcome(j) for j in jobs]
        self.todo = list(range(len(jobs)))
        self.workers: list[_Worker] = []
        self.ended: list[int] = []  # pids of every worker that ran, for the removal of leftovers
        self.next_wid = 1
        self.failed = False

    # -- workers
    def _start_worker(self) -> _Worker:
        inbox_recv, inbox_send = self.ctx.Pipe(duplex=False)
        outbox_recv, outbox_send = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(target=_worker_main, args=(self.next_wid, os.getpid(), inbox_recv, outbox_send),
                                   name=f"dissect-unlearning worker {self.next_wid}")
        # Started with SIGINT ignored, which the new process inherits: a Ctrl-C while it imports would otherwise end
        # it with a traceback before its own handlers are in place.
        main = threading.current_thread() is threading.main_thread()
        before = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            process.start()
        finally:
            if main:
                signal.signal(signal.SIGINT, before)
        inbox_recv.close()
        outbox_send.close()
        w = _Worker(self.next_wid, process, inbox_send, outbox_recv)
        self.next_wid += 1
        self.workers.append(w)
        self.board.note(f"worker {w.wid}: pid {process.pid}")
        return w

    def _dispatch(self, w: _Worker) -> None:
        if w.retiring or (self.failed and self.stop_on_error):
            return
        if not self.todo:
            return
        index = self.todo[0]
        job = self.jobs[index]
        try:
            w.inbox.send((index, job.fn, job.args))
        except OSError:
            return  # the worker has just ended: its sentinel brings it to _ended, and the job goes to another
        self.todo.pop(0)
        # "starting" until the worker says it has begun: a new worker first imports what the job needs
        w.job, w.started, w.stage, w.detail, w.done = index, time.monotonic(), "starting", "", 0.0
        self.board.note(f"worker {w.wid}: started {job.label}")

    def _finish(self, w: _Worker, result=None, error=None, details=None) -> None:
        index = w.job
        o = self.outcomes[index]
        o.seconds = time.monotonic() - w.started
        o.result, o.error, o.details, o.finished = result, error, details, True
        w.job, w.stage, w.detail = None, "", ""
        if self.fresh and not w.retiring:
            # Its memory goes back to the system with the process: a long-lived worker keeps the high-water mark
            # of every job it ran (the allocator holds freed memory), and the next job starts on a clean heap.
            w.retiring = True
            with contextlib.suppress(OSError):
                w.inbox.send(None)
        if error is not None:
            self.failed = True
        if self.on_result:
            self.on_result(index, o, self.board.say)

    def _receive(self, w: _Worker) -> bool:
        """Handle one message of worker `w`; False once it has closed its end (it ended)."""
        try:
            message = w.outbox.recv()
        except (EOFError, OSError):
            return False  # its sentinel says the rest
        kind = message[0]
        if kind == "started" and w.job == message[1]:
            w.started, w.stage = time.monotonic(), ""
        elif kind == "stage":
            w.stage, w.detail = message[1], ""
            if w.job is not None:
                self.board.note(f"worker {w.wid}: {self.jobs[w.job].label}: {w.stage}")
            if message[2] is not None:
                w.done = float(message[2])
        elif kind == "detail":
            w.detail = message[1]
        elif kind == "done" and w.job == message[1]:
            self._finish(w, result=message[2])
        elif kind == "failed" and w.job == message[1]:
            self._finish(w, error=message[2], details=message[3])
        return True

    def _drain(self, w: _Worker) -> None:
        with contextlib.suppress(OSError):
            while w.outbox.poll() and self._receive(w):
                pass

    def _ended(self, w: _Worker) -> None:
        """Worker `w` has exited: report a job it left unfinished, and tidy up after it."""
        self._drain(w)  # its last messages may still be in the pipe
        w.process.join()
        self.ended.append(w.process.pid)
        if w.job is not None:
            code = w.process.exitcode
            how = (f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0
                   else f"exited with code {code}")
            removed = remove_leftovers([w.process.pid])
            note = f"; {len(removed)} temporary cache folder(s) it left removed" if removed else ""
            self._finish(w, error=WorkerDied(f"worker {w.wid} (pid {w.process.pid}) {how} while running "
                                             f"{self.jobs[w.job].label}{note}"))
        self.workers.remove(w)
        with contextlib.suppress(OSError):
            w.inbox.close()
            w.outbox.close()

    # -- the loop
    def run(self) -> list[Outcome]:
        from multiprocessing.connection import wait

        for _ in range(min(self.n_workers, len(self.jobs))):
            self._dispatch(self._start_worker())
        while any(w.job is not None for w in self.workers) or (self.todo and not (self.failed
                                                                                  and self.stop_on_error)):
            # A worker that died is replaced while there is work left for it.
            while self.todo and len(self.workers) < self.n_workers and not (self.failed and self.stop_on_error):
                self._dispatch(self._start_worker())
            waitables = {}
            for w in self.workers:
                waitables[w.outbox] = w
                waitables[w.process.sentinel] = w
            for ready in wait(list(waitables), timeout=0.5):
                w = waitables[ready]
                if w not in self.workers:
                    continue
                if ready is w.outbox:
                    self._drain(w)
                elif not w.process.is_alive():
                    self._ended(w)
                    continue
                if w.job is None:
                    self._dispatch(w)
            self.board.tick(self.outcomes, self.workers, self.n_workers)
        self._close()
        return self.outcomes

    def _close(self) -> None:
        for w in self.workers:
            with contextlib.suppress(OSError):
                w.inbox.send(None)
        for w in list(self.workers):
            w.process.join(STOP_GRACE)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            self.ended.append(w.process.pid)
            with contextlib.suppress(OSError):
                w.inbox.close()
                w.outbox.close()
        self.workers = []

    def stop(self, why: BaseException) -> None:
        """End every worker and what it started: SIGTERM, then SIGKILL after STOP_GRACE seconds (at once on a
        second Ctrl-C); then remove the temporary folders of those that died writing."""
        t0 = time.monotonic()
        hurry = threading.Event()
        main = threading.current_thread() is threading.main_thread()
        before = {}
        if main:
            for signum in (signal.SIGINT, signal.SIGTERM):
                before[signum] = signal.signal(signum, lambda *_: hurry.set())
        try:
            tree = []
            for w in self.workers:
                tree += [w.process.pid, *descendants(w.process.pid)]
            for pid in tree:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM)
            deadline = t0 + STOP_GRACE
            while time.monotonic() < deadline and not hurry.is_set() and any(cache.pid_alive(p) for p in tree):
                for w in self.workers:
                    self._drain(w)  # a worker blocked on a full pipe could not exit
                time.sleep(0.05)
            killed = [p for p in tree if cache.pid_alive(p)]
            for pid in killed:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            for w in self.workers:
                w.process.join(5)
                self.ended.append(w.process.pid)
            for pid in killed:  # not our children (a kernel): wait until the system has taken them down
                end = time.monotonic() + 5
                while cache.pid_alive(pid) and time.monotonic() < end:
                    time.sleep(0.02)
            removed = remove_leftovers(self.ended + tree)
        finally:
            for signum, handler in before.items():
                signal.signal(signum, handler)
        running = [self.jobs[w.job].label for w in self.workers if w.job is not None]
        finished = sum(1 for o in self.outcomes if o.finished)
        self.workers = []
        self.board.say(
            f"{self.board.name}: stopped by {stop_reason(why)} after {clock(time.monotonic() - self.board.t0)}: "
            f"{len(tree)} process(es) ended in {time.monotonic() - t0:.1f} s"
            + (f" ({len(killed)} killed after {STOP_GRACE:.0f} s)" if killed else "")
            + (f", {len(removed)} temporary cache folder(s) of killed writers removed" if removed else "")
            + f"; {finished}/{len(self.jobs)} finished"
            + (f", interrupted: {'; '.join(running)}" if running else "")
            + ". What finished is cached: run the same command again to go on from there.")


def run_jobs(jobs: list[Job], workers: int, *, name: str, log: Path | None = None, verbose: bool = True,
             on_result: Callable | None = None, stop_on_error: bool = False, fresh: bool = False) -> list[Outcome]:
    """Run `jobs` in `workers` processes, in the order given; return their outcomes in that order.

    `on_result(index, outcome, say)` is called in the parent as each job ends (`say(text, err=False)` prints a line
    without garbling the status line, and logs it). With `stop_on_error`, no job starts after one failed (the
    running ones end). A job that raises does not stop the others otherwise; its outcome holds the error.
    Ctrl-C, SIGTERM or SIGHUP stop everything (see the module's docstring) and raise KeyboardInterrupt (Stopped
    for SIGTERM / SIGHUP) once the workers are gone. `fresh`: every job in a new process (one job per worker).
    """
    board = _Board(name, jobs, log, verbose)
    board.note(f"{name}: {len(jobs)} job(s), {min(workers, len(jobs))} at a time, parent pid {os.getpid()}")
    run = _Run(jobs, max(1, workers), board, on_result, stop_on_error, fresh)
    try:
        with stop_on_signals():
            try:
                outcomes = run.run()
            except BaseException as exc:
                run.stop(exc)
                raise
        board.tick(outcomes, [], workers, final=True)
        return outcomes
    finally:
        board.close()

