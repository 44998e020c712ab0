"""Failure propagation: a rank that raises makes every rank fail with an error naming it.

A rank whose own code raises writes ``"rank R failed in <where>: <error>"`` into the job's store
(the c10d store every rank already shares: torchrun's agent store, or the launcher's TCPStore,
which lives outside the ranks so it survives any of them) and raises :class:`RuntimeFailure`.
Its peers are then blocked in a collective with it; the collective fails when the failing
process exits (gloo sees the closed connection at once) or, at the latest, when the group
timeout expires. The peers' guard reads the store and raises ``RuntimeFailure("rank P: stopped
because rank R failed ...")``. No rank hangs longer than the group timeout.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from collections.abc import Iterator

import torch.distributed as dist

from autopar.core.errors import AutoparError, RuntimeFailure

log = logging.getLogger(__name__)

FAILED_KEY = "autopar/first_failure"
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


class FailureReporter:
    """Shares the first failure of a job through the c10d store."""

    def __init__(self, rank: int, store: dist.Store | None = None):
        self.rank = rank
        self.store = store if store is not None else _default_store()

    def report(self, where: str, exc: BaseException) -> str:
        cause = root_cause(exc)
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


@contextlib.contextmanager
def guard(reporter: FailureReporter | None, where: str, timeout_s: float | None = None) -> Iterator[None]:
    """Turn any exception inside into a :class:`RuntimeFailure` that names the rank that failed first."""
    try:
        yield
    except RuntimeFailure:
        raise
    except Exception as exc:
        if reporter is None:
            raise
        collective = _is_collective_error(exc)
        # A peer that failed first has reported already (or is about to, if we saw its exit).
        first = reporter.first_failure(_WAIT_FOR_REPORT_S if collective else 0.05)
        if first is not None and not first.startswith(f"rank {reporter.rank} "):
            raise RuntimeFailure(f"rank {reporter.rank}: stopped in {where} because {first}") from exc
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
