"""IP reputation table: CIDR -> score (0..100) with longest-prefix match.

File format, one entry per line::

    # comment
    10.0.0.0/8      15
    10.1.2.0/24     60     # trailing comments are fine
    192.0.2.7       90     # a bare address means /32 (IPv4) or /128 (IPv6)
    2001:db8::/32   80

Rules:

* IPv4 and IPv6 may be mixed freely; blank lines and surrounding whitespace are ignored.
* The score is a plain decimal integer in 0..100.
* Host bits must be clear: ``10.0.0.1/8`` is rejected rather than silently widened, since a
  typo there would change the score of 16M addresses.
* A prefix listed twice keeps the score of its *last* occurrence (later lines override
  earlier ones, so a list can be patched by appending to it).
* Nested prefixes resolve to the most specific one (longest-prefix match).

Any malformed line raises :class:`ReputationFileError` with a one-line ``PATH:LINENO: reason``
message.

Design (why it looks like this): the table is built once in the supervisor and then shared with
pre-forked workers through copy-on-write. Keeping millions of Python objects would make every
worker dirty (and so privately copy) the pages they live on as soon as lookups touch their
refcounts or the garbage collector walks them, so after loading only a few flat ``array``
buffers remain (plus a handful of ints):

* the longest-prefix match is precomputed into disjoint sorted intervals covering the whole
  address space: ``starts[i] .. starts[i+1]-1`` has score ``scores[i]`` (255 = unlisted);
  adjacent intervals with equal scores are merged;
* a direct index with about one bucket per interval (at most 2**20), laid over the span the
  intervals actually use, gives for an address the short slice of intervals to search; the
  search is a C-level ``bisect`` on the array.

A lookup therefore does a fixed amount of Python work plus a bisect over an average of about
one interval, whatever the file size. For IPv4 the bisect is also bounded in the worst case
(16 probes; see ``_Family``). IPv6 starts are stored as two 64-bit halves and searched with a
bisect on the high halves, plus one on the low halves only when some prefix is longer than
/64; a pathological list (a million /128s in one /64) degrades to a plain binary search, still
in C. Loading is a parse loop (``inet_pton``, no ``ipaddress`` objects) into a temporary dict,
one sort, and one linear sweep that flattens nested prefixes with a stack.
"""

from __future__ import annotations

import os
import socket
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from itertools import repeat

__all__ = ["MAX_SCORE", "UNLISTED", "ReputationFileError", "ReputationTable"]

MAX_SCORE = 100
# Score byte meaning "no prefix covers this address"; any value > MAX_SCORE works.
UNLISTED = 255

# Cap on the first-level index size, in bits (2**20 uint32 = 4 MiB). Finer buckets mean fewer
# bisect probes, but past that the index itself stops fitting in cache and lookups get slower
# (measured on 1M entries).
_INDEX_BITS_MAX = 20


def _typecode(size: int, candidates: str) -> str:
    for code in candidates:
        if array(code).itemsize == size:
            return code
    raise RuntimeError(f"no array typecode with itemsize {size}")  # pragma: no cover


_U32 = _typecode(4, "IL")
_U64 = _typecode(8, "QL")
_MASK64 = (1 << 64) - 1

# Fast paths for the two small integer fields: a dict hit avoids int() on the common canonical
# spellings; anything else goes through the strict slow path (which also builds the message).
_SCORES = {str(i): i for i in range(MAX_SCORE + 1)}
_PLEN4 = {str(i): i for i in range(33)}
_PLEN6 = {str(i): i for i in range(129)}
_HOSTMASK4 = [(1 << (32 - p)) - 1 for p in range(33)]
_HOSTMASK6 = [(1 << (128 - p)) - 1 for p in range(129)]


class ReputationFileError(ValueError):
    """A malformed reputation line; ``str()`` is ``PATH:LINENO: reason``."""

    def __init__(self, source: str, lineno: int, reason: str) -> None:
        super().__init__(f"{source}:{lineno}: {reason}")
        self.source = source
        self.lineno = lineno
        self.reason = reason

    def __reduce__(self) -> tuple[type[ReputationFileError], tuple[str, int, str]]:
        # Picklable with its real arguments (e.g. to report a reload failure across processes).
        return type(self), (self.source, self.lineno, self.reason)


def _small_int(text: str, maximum: int) -> int | None:
    """Strict decimal in 0..maximum (leading zeros allowed), else None.

    Slow path behind the dict fast paths; int() alone would also accept "+5", "1_0" and
    non-ASCII digits, which the file format does not.
    """
    if text.isascii() and text.isdigit() and int(text) <= maximum:
        return int(text)
    return None


def _bad_score(text: str) -> str:
    if text.isascii() and text.isdigit():
        return f"score {int(text)} out of range 0..{MAX_SCORE}"
    return f"invalid score {text!r}: expected an integer 0..{MAX_SCORE}"


def _bad_prefixlen(net: str, text: str, maxlen: int) -> str:
    if text.isascii() and text.isdigit():
        return f"prefix length {int(text)} out of range 0..{maxlen} in {net!r}"
    return f"invalid prefix length in {net!r}"


def _host_bits_message(
    net: str, value: int, plen: int, network: type[IPv4Network | IPv6Network]
) -> str:
    # Only reached on errors, so ipaddress is affordable here.
    return f"host bits set in {net!r} (did you mean {network((value, plen), strict=False)}?)"


def _parse(lines: Iterable[str], source: str) -> tuple[dict[int, int], dict[int, int], int]:
    """Parse lines into one dict per family, last duplicate winning.

    Keys are ``network << 8 | prefixlen`` (the identity of a prefix), values the packed entry
    ``key << 8 | score``. Packing into single ints keeps the temporary structures small, and
    sorting the packed entries orders them by start address then shorter prefix first, which
    is exactly the order the interval sweep needs. Returns (v4, v6, number_of_entry_lines).
    """
    v4: dict[int, int] = {}
    v6: dict[int, int] = {}
    count = 0
    inet_pton = socket.inet_pton
    from_bytes = int.from_bytes
    scores = _SCORES
    # what differs between the families, picked once per line
    family4 = (socket.AF_INET, "IPv4", 32, _PLEN4, _HOSTMASK4, IPv4Network, v4)
    family6 = (socket.AF_INET6, "IPv6", 128, _PLEN6, _HOSTMASK6, IPv6Network, v6)

    for lineno, raw in enumerate(lines, 1):
        fields = (raw.partition("#")[0] if "#" in raw else raw).split()
        if not fields:
            continue
        if len(fields) != 2:
            if len(fields) == 1:
                reason = f"missing score after {fields[0]!r}"
            else:
                reason = f"expected 'CIDR SCORE', got {len(fields)} fields"
            raise ReputationFileError(source, lineno, reason)
        net, score_text = fields
        score = scores.get(score_text)
        if score is None and (score := _small_int(score_text, MAX_SCORE)) is None:
            raise ReputationFileError(source, lineno, _bad_score(score_text))
        addr, slash, plen_text = net.partition("/")
        af, name, bits, plens, hostmask, network, table = family6 if ":" in addr else family4
        try:
            value = from_bytes(inet_pton(af, addr), "big")
        except (OSError, ValueError, UnicodeError):
            raise ReputationFileError(
                source, lineno, f"invalid {name} address in {net!r}"
            ) from None
        plen = plens.get(plen_text) if slash else bits
        if plen is None and (plen := _small_int(plen_text, bits)) is None:
            raise ReputationFileError(source, lineno, _bad_prefixlen(net, plen_text, bits))
        if value & hostmask[plen]:
            raise ReputationFileError(source, lineno, _host_bits_message(net, value, plen, network))
        key = value << 8 | plen
        table[key] = key << 8 | score
        count += 1
    return v4, v6, count


def _intervals(prefixes: dict[int, int], width: int) -> tuple[list[int], list[int]]:
    """Flatten nested prefixes into disjoint intervals (starts, scores), starts[0] == 0.

    Prefixes are visited by start address, enclosing ones first. CIDR blocks never partially
    overlap, so they nest like parentheses: a stack holds the enclosing open prefixes and
    (cur_end, cur_score) the innermost one, the whole space being an implicit unlisted root.
    Opening or closing a prefix emits a boundary carrying the score in force from there on;
    adjacent intervals with equal scores are merged, so the output is minimal.

    This loop runs once per prefix, hence the inlining and local aliases.
    """
    entries: list[int] | array[int] = sorted(prefixes.values())
    if width == 32:
        # Iterating an array creates each int afresh in the same recycled memory, instead of
        # chasing 1M ints scattered in file order: the loop runs about 2x faster.
        entries = array(_U64, entries)
    starts = [0]
    values = [UNLISTED]
    add_start, add_value = starts.append, values.append
    last_pos, last_val = 0, UNLISTED
    sizes = [1 << (width - p) for p in range(width + 1)]
    stack: list[tuple[int, int]] = []
    push, pop = stack.append, stack.pop
    space = 1 << width
    cur_end, cur_score = space, UNLISTED  # the root never closes before the end

    def emit_same_pos(score: int) -> tuple[int, int]:
        # Several boundaries at one address: the last one emitted wins (innermost / next).
        if len(values) > 1 and values[-2] == score:
            starts.pop()
            values.pop()
        else:
            values[-1] = score
        return starts[-1], score

    for entry in entries:
        start = entry >> 16
        while cur_end <= start:
            pos = cur_end
            cur_end, cur_score = pop()
            if pos == last_pos:
                last_pos, last_val = emit_same_pos(cur_score)
            elif cur_score != last_val:
                add_start(pos)
                add_value(cur_score)
                last_pos, last_val = pos, cur_score
        score = entry & 0xFF
        if start == last_pos:
            last_pos, last_val = emit_same_pos(score)
        elif score != last_val:
            add_start(start)
            add_value(score)
            last_pos, last_val = start, score
        push((cur_end, cur_score))
        cur_end, cur_score = start + sizes[(entry >> 8) & 0xFF], score
    while stack:
        pos = cur_end
        cur_end, cur_score = pop()
        if pos == space:
            continue  # a prefix reaching the end of the space closes nowhere
        if pos == last_pos:
            last_pos, last_val = emit_same_pos(cur_score)
        elif cur_score != last_val:
            add_start(pos)
            add_value(cur_score)
            last_pos, last_val = pos, cur_score
    return starts, values


def _score(value: int) -> int | None:
    return None if value == UNLISTED else value


class _Family:
    """Flat, copy-on-write friendly lookup structure for one address family.

    Only arrays and plain ints are kept: nothing per entry survives construction.

    ``index[b]`` is the number of interval starts <= the first address of bucket ``b``, so the
    interval holding an address of bucket ``b`` is among ``index[b] - 1 .. index[b + 1] - 1``;
    the first of those is known to start at or before the address, so the bisect only has to
    look at ``index[b] .. index[b + 1]`` and may answer ``index[b] - 1``.
    """

    __slots__ = (
        "above",
        "base",
        "below",
        "count",
        "index",
        "intervals",
        "low",
        "low_zero",
        "scores",
        "shift",
        "starts",
        "top",
    )

    def __init__(self, prefixes: dict[int, int], width: int) -> None:
        self.count = len(prefixes)
        starts, values = _intervals(prefixes, width)
        n = len(starts)
        self.intervals = n
        # Outside [base, top) the answer is the first / last interval: no index needed there,
        # and the index resolution is spent only on the span the file actually uses.
        self.below, self.above = _score(values[0]), _score(values[-1])
        self.base, self.top = (starts[1], starts[-1]) if n > 1 else (0, 0)
        self.scores = array("B", values)
        if width == 32:
            self.starts = array(_U32, starts)
            self.low = array(_U64)
            self.low_zero = True
        else:
            # 128-bit starts as two 64-bit halves: arrays have no wider item type.
            self.starts = array(_U64, [s >> 64 for s in starts])
            self.low = array(_U64, [s & _MASK64 for s in starts])
            # All boundaries on /64 multiples (lists of /64 or shorter): one bisect suffices.
            self.low_zero = not any(self.low)
            if self.low_zero:
                self.low = array(_U64)
        # About one interval per bucket on average keeps the bisect at a probe or two however
        # large the file is. Worst case for IPv4: a bisect over a bucket is bounded both by
        # the n intervals and by the 2**(32 - bits) addresses the bucket spans, so it never
        # exceeds 16 probes.
        bits = min(n.bit_length(), _INDEX_BITS_MAX)
        span = self.top - self.base
        self.shift = max(0, (span - 1).bit_length() - bits) if span else 0
        buckets = ((span - 1) >> self.shift) + 1 if span else 0
        step = 1 << self.shift
        # C-level map over a range: 2M buckets are indexed in a fraction of a second.
        self.index = array(
            _U32,
            map(
                bisect_right,
                repeat(starts, buckets + 1),
                range(self.base, self.base + (buckets + 1) * step, step),
            ),
        )

    def nbytes(self) -> int:
        arrays = (self.starts, self.low, self.scores, self.index)
        return sum(len(a) * a.itemsize for a in arrays)


class ReputationTable:
    """Immutable CIDR -> score table with longest-prefix-match lookups.

    Build it with :meth:`load` or :meth:`from_lines`; look up with :meth:`lookup` (an
    ``ipaddress`` object) or the integer fast paths :meth:`lookup_v4` / :meth:`lookup_v6`.
    Lookups return the score (0..100) or ``None`` when no prefix covers the address. IPv4 and
    IPv6 are separate spaces: an IPv4-mapped IPv6 address is looked up as IPv6.
    """

    __slots__ = ("_v4", "_v6", "duplicates", "source")

    def __init__(
        self, v4: dict[int, int], v6: dict[int, int], source: str, duplicates: int = 0
    ) -> None:
        # Internal: takes the parser's per-family dicts; use load() or from_lines().
        self.source = source
        self.duplicates = duplicates
        self._v4 = _Family(v4, 32)
        self._v6 = _Family(v6, 128)

    @classmethod
    def from_lines(cls, lines: Iterable[str], source: str = "<lines>") -> ReputationTable:
        """Build a table from reputation-file lines; ``source`` names them in error messages."""
        v4, v6, count = _parse(lines, source)
        return cls(v4, v6, source, count - len(v4) - len(v6))

    @classmethod
    def from_sources(
        cls, sources: Iterable[tuple[Iterable[str], str]], source: str
    ) -> ReputationTable:
        """One table from several ``(lines, name)`` sources, later ones winning for the
        same prefix (longest-prefix match still decides between nested ones)."""
        v4: dict[int, int] = {}
        v6: dict[int, int] = {}
        count = 0
        for lines, name in sources:
            a, b, n = _parse(lines, name)
            v4.update(a)
            v6.update(b)
            count += n
        return cls(v4, v6, source, count - len(v4) - len(v6))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ReputationTable:
        """Load a reputation file (UTF-8; undecodable bytes surface as a bad-line error)."""
        source = os.fspath(path)
        with open(source, encoding="utf-8", errors="replace") as f:
            return cls.from_lines(f, source)

    def lookup_v4(self, addr: int) -> int | None:
        """Score of the IPv4 address given as an int (0 <= addr < 2**32), or None."""
        fam = self._v4
        base = fam.base
        if addr < base:
            return fam.below
        if addr >= fam.top:
            return fam.above
        index = fam.index
        b = (addr - base) >> fam.shift
        score = fam.scores[bisect_right(fam.starts, addr, index[b], index[b + 1]) - 1]
        return None if score == UNLISTED else score

    def lookup_v6(self, addr: int) -> int | None:
        """Score of the IPv6 address given as an int (0 <= addr < 2**128), or None."""
        fam = self._v6
        base = fam.base
        if addr < base:
            return fam.below
        if addr >= fam.top:
            return fam.above
        index = fam.index
        b = (addr - base) >> fam.shift
        high = fam.starts
        if fam.low_zero:
            i = bisect_right(high, addr >> 64, index[b], index[b + 1]) - 1
        else:
            # Last i with (high[i], low[i]) <= (ah, al): find the run of equal high halves,
            # then bisect the low halves inside it; an empty match falls back to the entry
            # just before the run, which is the last one with a smaller high half.
            ah = addr >> 64
            end = index[b + 1]
            j = bisect_left(high, ah, index[b], end)
            k = bisect_right(high, ah, j, end)
            i = bisect_right(fam.low, addr & _MASK64, j, k) - 1
        score = fam.scores[i]
        return None if score == UNLISTED else score

    def lookup(self, addr: IPv4Address | IPv6Address) -> int | None:
        """Score of an ``ipaddress`` address, or None when unlisted."""
        if addr.version == 4:
            return self.lookup_v4(int(addr))
        return self.lookup_v6(int(addr))

    def __len__(self) -> int:
        """Number of distinct prefixes loaded (duplicates counted once)."""
        return self._v4.count + self._v6.count

    @property
    def intervals(self) -> int:
        """Number of disjoint address ranges the prefixes were flattened into (both families)."""
        return self._v4.intervals + self._v6.intervals

    def nbytes(self) -> int:
        """Memory held by the lookup arrays, in bytes."""
        return self._v4.nbytes() + self._v6.nbytes()

    def summary(self) -> str:
        """One line for logs."""
        return (
            f"{self.source}: {len(self)} prefixes ({self._v4.count} IPv4, {self._v6.count} IPv6"
            f", {self.duplicates} duplicates overridden), "
            f"{self.intervals} intervals, "
            f"{self.nbytes() / 1048576:.1f} MiB"
        )

    def __repr__(self) -> str:
        return f"<ReputationTable {self.summary()}>"
