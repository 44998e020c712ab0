"""Files the CLI writes: checked before any work starts, never written over an input, never left
half-written.

A plan search can take minutes; an output path that cannot be written must fail before it, not
after. A write goes to a temporary file in the output's own directory and is renamed over the
target (``os.replace``, atomic on POSIX), so an interrupted or failed write leaves the old file
whole, and ``autopar report plan.json -o plan.json`` is refused instead of replacing the plan.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from autopar.core.errors import UsageError


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def check_output(
    path: str | os.PathLike, *, flag: str, inputs: Iterable[str | os.PathLike | None] = ()
) -> Path:
    """Raise :class:`UsageError` unless ``path`` can be written without losing an input.

    ``flag`` names the option in the message (``--out``); ``inputs`` are the files the command reads.
    """
    out = Path(path)
    for given in inputs:
        if given and _same_file(out, Path(given)):
            raise UsageError(
                f"{flag} {str(out)!r} is the input file {str(given)!r}; writing it would destroy the "
                "input: choose another output path"
            )
    if out.is_dir():
        raise UsageError(f"{flag} {str(out)!r} is a directory; give a file path such as {str(out / 'out')!r}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(
            f"{flag} {str(out)!r}: the directory {str(parent)!r} does not exist; create it first "
            f"(mkdir -p {parent}) or choose another path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(
            f"{flag} {str(out)!r}: the directory {str(parent)!r} is not writable; choose another path"
        )
    if out.exists() and not out.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise UsageError(
            f"{flag} {str(out)!r} is read-only; make it writable (chmod u+w) or choose another path"
        )
    return out


def _mode_for(out: Path) -> int:
    """The replaced file's permissions, or what a plain ``open(out, "w")`` would give (0o666 - umask):
    mkstemp's private 0o600 must not leak into the output."""
    if out.exists():
        return stat.S_IMODE(out.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, flag: str) -> Iterator[Path]:
    """A temporary path next to ``path`` (same suffix) that replaces ``path`` when the block ends
    without an error; on an error it is removed and ``path`` is untouched."""
    out = Path(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{out.name}.", suffix=out.suffix, dir=out.parent if str(out.parent) else "."
    )
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _mode_for(out))
        os.replace(tmp, out)
    except OSError as e:
        raise UsageError(
            f"{flag} {str(out)!r}: cannot write it ({e.strerror or e}); choose another path"
        ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str, *, flag: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), flag=flag)


def write_with(path: str | os.PathLike, writer: Callable[[Path], object], *, flag: str) -> None:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path, flag=flag) as tmp:
        writer(tmp)
