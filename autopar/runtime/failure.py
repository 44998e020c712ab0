"""Failure propagation: a rank that raises makes every rank fail with an error naming it.

A rank whose own code raises writes ``"rank R failed in <where>: <error>"`` into the job's store
(the c10d store every rank already shares: torchrun's agent store, or the launcher's TCPStore,
which lives outside the ranks so it survives any of them) and raises :class:`RuntimeFailure`.
Its peers are then blocked in a collective with it; the collective fails when the failing
process exits (gloo sees the closed connection at once) or, at the latest, when the group
timeout expires. The peers' guard reads the store and raises ``RuntimeFailure("rank P: stopped
because rank R failed ...")``. No rank hangs longer than the group timeout.

A rank killed by a signal (SIGKILL, the out-of-memory killer) reports nothing. Every rank
therefore also keeps a heartbeat in the store (a counter a daemon thread increments every
``HEARTBEAT_S``) and records where it is (``"step 3"``) on entering each guarded phase; a peer
whose collective failed with no report watches the counters for ``_WAIT_FOR_REPORT_S`` and names
the ranks whose heartbeat stopped, with the phase each was in. Counters, not timestamps: the
ranks of a multi-node job do not share a clock.

Under torchrun the agent sends SIGTERM to the surviving ranks within a fraction of a second of a
rank's death, before that watch ends. :func:`defer_termination` lets a rank that is analysing a
failure finish it (at most ``TERMINATION_GRACE_S``) so that its report reaches the log; a rank
doing anything else exits within a second (status 143, 128 + SIGTERM).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator

import torch.distributed as dist

from autopar.core.errors import AutoparError, RuntimeFailure

log = logging.getLogger(__name__)

FAILED_KEY = "autopar/first_failure"
HEARTBEAT_S = 0.2
TERMINATION_GRACE_S = 4.0
_analysing = threading.Event()
_terminating = threading.Event()
_WAIT_FOR_REPORT_S = 2.0
_COLLECTIVE_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Timed out",
    "timed out",
    "gloo",
    "NCCL",
)


def _default_store() -> dist.Store | None:
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store: failures are still raised, just not shared
        return None


def _chain(exc: BaseException) -> list[BaseException]:
    out = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _is_collective_error(exc: BaseException) -> bool:
    """A communication failure (a peer died or timed out), as opposed to this rank's own bug."""
    for e in _chain(exc):
        if isinstance(e, dist.DistError):
            return True
        text = str(e)
        if any(s in text for s in _COLLECTIVE_MARKERS):
            return True
    return False


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a chain (the user's error under library wrappers)."""
    return _chain(exc)[-1]


def _reported_cause(exc: BaseException) -> BaseException:
    """The outermost :class:`AutoparError` of the chain (a message written for the user, over the
    torch error it explains), else the innermost exception."""
    return next((e for e in _chain(exc) if isinstance(e, AutoparError)), None) or root_cause(exc)


def _heartbeat_key(rank: int) -> str:
    return f"autopar/heartbeat/{rank}"


def _where_key(rank: int) -> str:
    return f"autopar/where/{rank}"


class _Heartbeat:
    """One daemon thread per process incrementing this rank's counter in the stores it was given:
    the latest store of each kind (the launcher's TCPStore, the default group's PrefixStore), so a
    re-initialised process group gets the beat and a stale store stops getting it."""

    _lock = threading.Lock()
    _stores: dict[str, tuple[dist.Store, int]] = {}
    _thread: threading.Thread | None = None
    _stop = threading.Event()

    @classmethod
    def start(cls, store: dist.Store, rank: int) -> None:
        with cls._lock:
            cls._stores[type(store).__name__] = (store, rank)
            if cls._thread is None or not cls._thread.is_alive():
                cls._stop.clear()
                cls._thread = threading.Thread(target=cls._beat, name="autopar-heartbeat", daemon=True)
                cls._thread.start()
                atexit.register(cls.stop)

    @classmethod
    def stop(cls) -> None:
        """Join the thread at interpreter exit: a store call still running while torch's C++
        state is torn down could crash the process after a successful run."""
        cls._stop.set()
        thread = cls._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)

    @classmethod
    def _beat(cls) -> None:
        while not cls._stop.is_set():
            with cls._lock:
                targets = list(cls._stores.items())
            for kind, (store, rank) in targets:
                try:
                    store.add(_heartbeat_key(rank), 1)
                except Exception:  # noqa: BLE001 - the store is gone (the job is ending): drop it
                    with cls._lock:
                        if cls._stores.get(kind, (None,))[0] is store:
                            del cls._stores[kind]
            cls._stop.wait(HEARTBEAT_S)


class FailureReporter:
    """Shares the first failure of a job through the c10d store."""

    def __init__(self, rank: int, store: dist.Store | None = None, world_size: int | None = None):
        self.rank = rank
        self.store = store if store is not None else _default_store()
        if world_size is None and dist.is_initialized():
            world_size = dist.get_world_size()
        self.world_size = world_size
        if self.store is not None and world_size is not None and world_size > 1:
            _Heartbeat.start(self.store, rank)

    def enter(self, where: str) -> None:
        """Record the phase this rank is in, for a peer to name if this rank dies silently."""
        if self.store is None:
            return
        # Best effort: without it only the report of a crash loses detail.
        with contextlib.suppress(Exception):
            self.store.set(_where_key(self.rank), where)

    def heartbeats(self) -> dict[int, int]:
        """Every rank's heartbeat counter (0 for a rank that never beat)."""
        if self.store is None or not self.world_size:
            return {}
        out = {}
        try:
            for r in range(self.world_size):
                out[r] = self.store.add(_heartbeat_key(r), 0)
        except Exception:  # noqa: BLE001 - the store is gone: nothing to learn from it
            return {}
        return out

    def silent_ranks(self, before: dict[int, int]) -> str | None:
        """``"rank R (in step 3)"`` for the ranks whose heartbeat has not moved since ``before``."""
        after = self.heartbeats()
        dead = [r for r in sorted(before) if r != self.rank and after.get(r) == before[r]]
        if not dead:
            return None
        names = []
        for r in dead:
            try:
                where = self.store.get(_where_key(r)).decode() if self.store.check([_where_key(r)]) else None
            except Exception:  # noqa: BLE001
                where = None
            names.append(f"rank {r}" + (f" (in {where})" if where else ""))
        return ", ".join(names)

    def report(self, where: str, exc: BaseException) -> str:
        cause = _reported_cause(exc)
        message = f"rank {self.rank} failed in {where}: {type(cause).__name__}: {cause}"
        if self.store is not None:
            try:
                self.store.compare_set(FAILED_KEY, "", message)
                self.store.set(f"autopar/failed/{self.rank}", message)
            except Exception as store_exc:  # noqa: BLE001 - the store may be gone; keep the original error
                log.warning("could not record the failure in the store: %s", store_exc)
        return message

    def first_failure(self, wait_s: float = _WAIT_FOR_REPORT_S) -> str | None:
        if self.store is None:
            return None
        # Poll with check(): store.wait() logs a warning on every timeout.
        deadline = time.monotonic() + wait_s
        try:
            while True:
                if self.store.check([FAILED_KEY]):
                    return self.store.get(FAILED_KEY).decode()
                if time.monotonic() >= deadline:
                    return None
                time.sleep(0.05)
        except Exception:  # noqa: BLE001 - the store is gone: nothing to learn from it
            return None


def defer_termination(grace_s: float = TERMINATION_GRACE_S) -> bool:
    """Install a SIGTERM handler that gives a failure analysis in progress ``grace_s`` to finish
    (the launcher stopping the job must not swallow the report naming the rank that died). Only
    from the main thread and over the default handler; returns whether it was installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return False  # the user's own handler wins

    def exit_when_done(signum: int) -> None:
        deadline = time.monotonic() + grace_s
        idle_since = None
        while time.monotonic() < deadline:
            if _analysing.is_set():
                idle_since = None
            else:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > 1.0:  # not (or no longer) reporting
                    break
            time.sleep(0.05)
        sys.stderr.flush()
        os._exit(128 + signum)

    def on_sigterm(signum: int, frame: object) -> None:
        _terminating.set()
        threading.Thread(target=exit_when_done, args=(signum,), daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    return True


@contextlib.contextmanager
def guard(reporter: FailureReporter | None, where: str, timeout_s: float | None = None) -> Iterator[None]:
    """Turn any exception inside into a :class:`RuntimeFailure` that names the rank that failed first."""
    if reporter is not None:
        reporter.enter(where)
    try:
        yield
    except RuntimeFailure:
        raise
    except Exception as exc:
        if reporter is None:
            raise
        collective = _is_collective_error(exc)
        _analysing.set()
        try:
            _explain(reporter, where, exc, collective, timeout_s)
        finally:
            _analysing.clear()


def _explain(
    reporter: FailureReporter, where: str, exc: Exception, collective: bool, timeout_s: float | None
) -> None:
    """Raise the error of :func:`guard` for ``exc`` (called inside its ``except``)."""
    beats = reporter.heartbeats() if collective else {}
    # A peer that failed first has reported already (or is about to, if we saw its exit).
    first = reporter.first_failure(_WAIT_FOR_REPORT_S if collective else 0.05)
    if first is not None and not first.startswith(f"rank {reporter.rank} "):
        raise RuntimeFailure(f"rank {reporter.rank}: stopped in {where} because {first}") from exc
    silent = reporter.silent_ranks(beats) if collective and beats else None
    if silent is not None:
        failure = RuntimeFailure(
            f"rank {reporter.rank}: stopped in {where} because {silent} stopped without reporting "
            f"an error (no heartbeat for {_WAIT_FOR_REPORT_S:g} s): it was killed or crashed "
            "(a signal such as SIGKILL, the out-of-memory killer, a segfault); see its own log "
            f"and the launcher's exit codes: {type(exc).__name__}: {exc}"
        )
        if _terminating.is_set():  # the launcher is ending this process: say it before it does
            log.error("%s", failure)
        raise failure from exc
    if collective:
        limit = f" (group timeout {timeout_s:g} s)" if timeout_s else ""
        raise RuntimeFailure(
            f"rank {reporter.rank}: a collective in {where} failed{limit} and no rank reported an "
            f"error first; a rank may have crashed or been killed: {type(exc).__name__}: {exc}"
        ) from exc
    message = reporter.report(where, exc)
    if isinstance(exc, AutoparError):
        raise  # a user error keeps its type (PlanError...); the peers still learn of it
    log.error("%s\n%s", message, traceback.format_exc())
    raise RuntimeFailure(message) from exc
