"""Blocklists (``--blocklist FILE[:SCORE]``) and watching the files a table came from.

A blocklist is one address or CIDR per line, the format of FireHOL's ``.netset`` /
``.ipset`` files and Spamhaus DROP; ``#`` and ``;`` start comments::

    # FireHOL level1
    1.10.16.0/20 ; SBL256894
    192.0.2.7

Every listed address gets the list's SCORE (default 0, "bad"). The lists and the
``--reputation-file`` make one :class:`~spoa_mp.reputation.ReputationTable`: files later
on the command line win for the same prefix, and the longest listed prefix wins between
nested ones, so a blocklisted /32 inside a reputation /8 gets the blocklist's score.

Watching: :class:`FileWatcher` runs in the supervisor's loop, which wakes for it. It
compares each file's (device, inode, size, mtime) every ``interval``. A file replaced by a
rename (``mv new old``, what list updaters do: a new inode, complete from the start) counts
at once; a file written in place counts once its signature held still for one more look,
so that it is not read half-way. The supervisor then does what SIGHUP does: the table is built
afresh in the supervisor, a new generation of workers forks and shares it copy-on-write,
and the old workers hand their connections over between two frames, losing nothing. A
file that fails to parse fails that reload: the workers keep the old table, and the log
says why with the file and line number; the next change of the file tries again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence

from spoa_mp.reputation import MAX_SCORE, ReputationFileError, ReputationTable

__all__ = [
    "DEFAULT_SCORE",
    "FileWatcher",
    "blocklist_lines",
    "load_table",
    "parse_blocklist_arg",
]

DEFAULT_SCORE = 0
WATCH_INTERVAL = 0.25  # seconds between two looks at the files (a stat() each)


def parse_blocklist_arg(text: str) -> tuple[str, int]:
    """``FILE`` or ``FILE:SCORE`` -> (FILE, SCORE); ValueError with the reason."""
    path, sep, score = text.rpartition(":")
    if not sep or not score.isdigit():  # no score (a ':' in the path may remain)
        path, score = text, str(DEFAULT_SCORE)
    if not path:
        raise ValueError(f"expected FILE[:SCORE], got {text!r}")
    if int(score) > MAX_SCORE:
        raise ValueError(f"score must be 0..{MAX_SCORE}, got {score} in {text!r}")
    return path, int(score)


def blocklist_lines(lines: Iterable[str], score: int, source: str) -> Iterator[str]:
    """Blocklist lines as reputation lines (``CIDR SCORE``), line numbers kept."""
    suffix = f" {score}"
    for lineno, raw in enumerate(lines, 1):
        line = raw
        if "#" in line:
            line = line.partition("#")[0]
        if ";" in line:
            line = line.partition(";")[0]
        fields = line.split()
        if len(fields) == 1:
            yield fields[0] + suffix
        elif not fields:
            yield ""
        else:
            raise ReputationFileError(
                source, lineno, f"expected one address or CIDR, got {len(fields)} fields"
            )


def load_table(
    reputation_file: str | None, blocklists: Sequence[tuple[str, int]]
) -> ReputationTable:
    """The table of the reputation file and the blocklists; ReputationFileError, OSError."""
    files = []
    try:
        sources: list[tuple[Iterable[str], str]] = []
        if reputation_file is not None:
            f = open(reputation_file, encoding="utf-8", errors="replace")  # noqa: SIM115
            files.append(f)
            sources.append((f, reputation_file))
        for path, score in blocklists:
            f = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
            files.append(f)
            sources.append((blocklist_lines(f, score, path), path))
        names = [reputation_file] if reputation_file else []
        names += [f"{p}:{s}" for p, s in blocklists]
        return ReputationTable.from_sources(sources, " + ".join(names))
    finally:
        for f in files:
            f.close()


Signature = tuple[int, int, int, int] | None


def _signature(path: str) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None  # gone for now (being replaced): a change like any other
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class FileWatcher:
    """Cheap change detection by stat(): ``changed()`` is True once a file's signature
    differs from the one last taken and held still for one more check."""

    def __init__(self, paths: Iterable[str], interval: float = WATCH_INTERVAL) -> None:
        self.paths = tuple(paths)
        self.interval = interval
        self._seen = [_signature(p) for p in self.paths]  # what the table was built from
        self._pending: list[Signature] | None = None  # a change waiting to settle
        self._next = time.monotonic() + interval

    @property
    def next_check(self) -> float:
        """When changed() looks next (time.monotonic()); inf when nothing is watched."""
        return self._next if self.paths else float("inf")

    def changed(self, now: float | None = None) -> list[str]:
        """The paths that changed and settled (empty most of the time)."""
        now = time.monotonic() if now is None else now
        if not self.paths or now < self._next:
            return []
        self._next = now + self.interval
        current = [_signature(p) for p in self.paths]
        if current == self._seen:
            self._pending = None
            return []
        renamed = all(
            b is not None and (a is None or a[:2] != b[:2])
            for a, b in zip(self._seen, current, strict=True)
            if a != b
        )
        if current != self._pending and not renamed:  # still moving? look again
            self._pending = current
            return []
        changed = [p for p, a, b in zip(self.paths, self._seen, current, strict=True) if a != b]
        self._seen, self._pending = current, None
        return changed
