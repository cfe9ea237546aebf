"""Tests for spoa_mp.reputation: file format, longest-prefix match, errors, scale."""

from __future__ import annotations

import gc
import pickle
import random
import socket
from array import array
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
)
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoa_mp.reputation import ReputationFileError, ReputationTable


def table(*lines: str) -> ReputationTable:
    return ReputationTable.from_lines(lines, source="t")


def score(tab: ReputationTable, addr: str) -> int | None:
    """Look up through both entry points and insist they agree."""
    ip = ip_address(addr)
    by_int = tab.lookup_v4(int(ip)) if ip.version == 4 else tab.lookup_v6(int(ip))
    assert tab.lookup(ip) == by_int
    return by_int


def assert_scores(tab: ReputationTable, expected: dict[str, int | None]) -> None:
    """score() of every address is the one given (all compared at once)."""
    assert {addr: score(tab, addr) for addr in expected} == expected


# --- longest-prefix match -------------------------------------------------------------------


def test_nested_ipv4_prefixes_resolve_to_most_specific() -> None:
    tab = table(
        "0.0.0.0/0 1",
        "10.0.0.0/8 15",
        "10.1.2.0/24 60",
        "10.1.2.3/32 90",
    )
    assert_scores(
        tab,
        {
            "9.255.255.255": 1,
            "10.0.0.0": 15,
            "10.1.1.255": 15,
            "10.1.2.0": 60,
            "10.1.2.2": 60,
            "10.1.2.3": 90,
            "10.1.2.4": 60,
            "10.1.2.255": 60,
            "10.1.3.0": 15,
            "10.255.255.255": 15,
            "11.0.0.0": 1,
            "0.0.0.0": 1,
            "255.255.255.255": 1,
        },
    )


def test_nested_prefixes_order_in_file_does_not_matter() -> None:
    tab = table("10.1.2.3/32 90", "10.1.2.0/24 60", "10.0.0.0/8 15", "0.0.0.0/0 1")
    assert [score(tab, a) for a in ("10.1.2.3", "10.1.2.4", "10.1.3.0", "11.0.0.0")] == [
        90,
        60,
        15,
        1,
    ]


def test_nested_ipv6_prefixes() -> None:
    tab = table(
        "::/0 2",
        "2001:db8::/32 80",
        "2001:db8:1::/48 40",
        "2001:db8:1:2::/64 30",
        "2001:db8:1:2::5/128 99",
    )
    assert_scores(
        tab,
        {
            "::1": 2,
            "2001:db7:ffff:ffff:ffff:ffff:ffff:ffff": 2,
            "2001:db8::": 80,
            "2001:db8:0:ffff::1": 80,
            "2001:db8:1::": 40,
            "2001:db8:1:1:ffff:ffff:ffff:ffff": 40,
            "2001:db8:1:2::": 30,
            "2001:db8:1:2::4": 30,
            "2001:db8:1:2::5": 99,
            "2001:db8:1:2::6": 30,
            "2001:db8:1:3::": 40,
            "2001:db8:2::": 80,
            "2001:db9::": 2,
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff": 2,
        },
    )


def test_ipv6_prefixes_no_longer_than_64() -> None:
    # Every boundary is a /64 multiple here, which takes the single-bisect path.
    tab = table("2001:db8::/32 80", "2001:db8:0:5::/64 10", "2a00::/12 3")
    assert_scores(
        tab,
        {
            "2001:db8:0:4:ffff:ffff:ffff:ffff": 80,
            "2001:db8:0:5::": 10,
            "2001:db8:0:5:ffff:ffff:ffff:ffff": 10,
            "2001:db8:0:6::": 80,
            "2a0f:ffff::1": 3,
        },
    )
    assert score(tab, "2a10::") is None
    assert score(tab, "2001:db7::") is None


@pytest.mark.parametrize(
    ("cidr", "first", "last", "before", "after"),
    [
        ("10.0.0.0/8", "10.0.0.0", "10.255.255.255", "9.255.255.255", "11.0.0.0"),
        ("192.0.2.128/25", "192.0.2.128", "192.0.2.255", "192.0.2.127", "192.0.3.0"),
        ("192.0.2.7/32", "192.0.2.7", "192.0.2.7", "192.0.2.6", "192.0.2.8"),
        ("0.0.0.0/1", "0.0.0.0", "127.255.255.255", None, "128.0.0.0"),
        ("255.255.255.0/24", "255.255.255.0", "255.255.255.255", "255.255.254.255", None),
        (
            "2001:db8:8000::/33",
            "2001:db8:8000::",
            "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
            "2001:db8:7fff:ffff:ffff:ffff:ffff:ffff",
            "2001:db9::",
        ),
        (
            "2001:db8::ff00/120",
            "2001:db8::ff00",
            "2001:db8::ffff",
            "2001:db8::feff",
            "2001:db8::1:0",
        ),
        ("::/1", "::", "7fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", None, "8000::"),
        ("ffff::/16", "ffff::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "fffe:ffff::", None),
    ],
)
def test_range_boundaries(
    cidr: str, first: str, last: str, before: str | None, after: str | None
) -> None:
    tab = table(f"{cidr} 42")
    assert score(tab, first) == 42
    assert score(tab, last) == 42
    if before is not None:
        assert score(tab, before) is None
    if after is not None:
        assert score(tab, after) is None


def test_adjacent_prefixes_keep_their_own_scores() -> None:
    tab = table("10.0.0.0/24 5", "10.0.1.0/24 5", "10.0.2.0/24 6", "10.0.2.0/25 5")
    assert_scores(
        tab,
        {
            "10.0.0.0": 5,
            "10.0.1.255": 5,
            "10.0.2.0": 5,
            "10.0.2.127": 5,
            "10.0.2.128": 6,
        },
    )
    assert score(tab, "10.0.3.0") is None


def test_equal_neighbours_are_merged_into_one_interval() -> None:
    # IPv4: unlisted | 10.0.0.0 - 10.0.1.255 -> 5 | unlisted, from two /24s and a nested /25;
    # IPv6: one unlisted range.
    tab = table("10.0.0.0/24 5", "10.0.1.0/24 5", "10.0.1.0/25 5")
    assert tab.intervals == 3 + 1
    assert score(tab, "10.0.1.200") == 5
    # The empty table is a single unlisted range per family.
    assert table().intervals == 2


def test_score_zero_is_distinct_from_unlisted() -> None:
    tab = table("10.0.0.0/8 30", "10.1.0.0/16 0")
    assert score(tab, "10.1.0.1") == 0
    assert score(tab, "10.2.0.1") == 30
    assert score(tab, "11.0.0.1") is None


def test_bare_addresses_are_host_routes() -> None:
    tab = table("192.0.2.7 70", "2001:db8::7 71")
    assert score(tab, "192.0.2.7") == 70
    assert score(tab, "192.0.2.6") is None
    assert score(tab, "192.0.2.8") is None
    assert score(tab, "2001:db8::7") == 71
    assert score(tab, "2001:db8::6") is None
    assert score(tab, "2001:db8::8") is None
    # Same prefixes as the explicit /32 and /128 spellings, so the later line overrides.
    tab = table("192.0.2.7 70", "192.0.2.7/32 72", "2001:db8::7/128 73", "2001:db8::7 74")
    assert (len(tab), tab.duplicates) == (2, 2)
    assert score(tab, "192.0.2.7") == 72
    assert score(tab, "2001:db8::7") == 74


def test_unlisted_addresses_return_none() -> None:
    tab = table("10.0.0.0/8 15", "2001:db8::/32 80")
    assert score(tab, "192.0.2.1") is None
    assert score(tab, "2001:db9::1") is None


def test_empty_table_lists_nothing() -> None:
    tab = table("# nothing here", "", "   ")
    assert len(tab) == 0
    assert score(tab, "0.0.0.0") is None
    assert score(tab, "255.255.255.255") is None
    assert score(tab, "::") is None
    assert score(tab, "2001:db8::1") is None


def test_families_are_separate() -> None:
    # IPv4-mapped IPv6 addresses are IPv6 to the table: ::/0 covers them, 0.0.0.0/0 does not.
    tab = table("0.0.0.0/0 10")
    assert score(tab, "::ffff:192.0.2.1") is None
    assert score(tab, "192.0.2.1") == 10
    tab = table("::/0 20")
    assert score(tab, "192.0.2.1") is None
    assert score(tab, "::ffff:192.0.2.1") == 20


def test_ipv4_mapped_prefix_can_be_listed_as_ipv6() -> None:
    tab = table("::ffff:192.0.2.0/120 33")
    assert score(tab, "::ffff:192.0.2.200") == 33
    assert score(tab, "192.0.2.200") is None


# --- file format ------------------------------------------------------------------------------


def test_comments_blank_lines_and_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "rep.txt"
    path.write_text(
        "# reputation list\n"
        "\n"
        "   \t  \n"
        "  10.0.0.0/8\t15   \n"
        "10.1.0.0/16 20# no space before the comment\n"
        "2001:db8::/32 80 # trailing comment\n"
        "\t# indented comment 192.0.2.0/24 99\n"
        "192.0.2.1 5\r\n"
        "192.0.2.2  6"  # no final newline
    )
    tab = ReputationTable.load(path)
    assert len(tab) == 5
    assert_scores(
        tab,
        {
            "10.0.0.1": 15,
            "10.1.0.1": 20,
            "2001:db8::1": 80,
            "192.0.2.1": 5,
            "192.0.2.2": 6,
        },
    )
    assert score(tab, "192.0.2.3") is None


def test_leading_zeros_in_numbers_are_accepted() -> None:
    tab = table("10.0.0.0/08 007", "10.1.0.0/016 100")
    assert score(tab, "10.0.0.1") == 7
    assert score(tab, "10.1.0.1") == 100


def test_duplicate_prefix_last_one_wins() -> None:
    tab = table("10.0.0.0/8 15", "2001:db8::/32 80", "10.0.0.0/8 25", "2001:db8::/32 0")
    assert score(tab, "10.1.2.3") == 25
    assert score(tab, "2001:db8::1") == 0
    assert len(tab) == 2
    assert tab.duplicates == 2
    # The spelling does not matter, the prefix does.
    tab = table("2001:0db8:0000::/32 1", "2001:db8::/32 2")
    assert score(tab, "2001:db8::1") == 2


def test_load_accepts_str_and_pathlike(tmp_path: Path) -> None:
    path = tmp_path / "rep.txt"
    path.write_text("10.0.0.0/8 15\n")
    assert score(ReputationTable.load(str(path)), "10.0.0.1") == 15
    assert score(ReputationTable.load(path), "10.0.0.1") == 15
    assert ReputationTable.load(path).source == str(path)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        # bad CIDR
        ("10.0.0.256/8 5", "invalid IPv4 address in '10.0.0.256/8'"),
        ("10.0.0/8 5", "invalid IPv4 address in '10.0.0/8'"),
        ("010.0.0.0/8 5", "invalid IPv4 address"),
        ("example.com 5", "invalid IPv4 address in 'example.com'"),
        ("2001:db8::g/32 5", "invalid IPv6 address in '2001:db8::g/32'"),
        ("1::2::3 5", "invalid IPv6 address"),
        ("fe80::1%eth0 5", "invalid IPv6 address"),
        ("10.0.0.0/ 5", "invalid prefix length in '10.0.0.0/'"),
        ("10.0.0.0/8/8 5", "invalid prefix length in '10.0.0.0/8/8'"),
        ("10.0.0.0/-1 5", "invalid prefix length"),
        ("10.0.0.0/+8 5", "invalid prefix length"),
        ("10.0.0.0/33 5", "prefix length 33 out of range 0..32 in '10.0.0.0/33'"),
        ("2001:db8::/129 5", "prefix length 129 out of range 0..128"),
        # host bits set
        ("10.0.0.1/8 5", "host bits set in '10.0.0.1/8' (did you mean 10.0.0.0/8?)"),
        ("2001:db8::1/32 5", "host bits set in '2001:db8::1/32' (did you mean 2001:db8::/32?)"),
        ("::1/64 5", "did you mean ::/64?"),
        # score
        ("10.0.0.0/8 101", "score 101 out of range 0..100"),
        ("10.0.0.0/8 -1", "invalid score '-1': expected an integer 0..100"),
        ("10.0.0.0/8 +5", "invalid score '+5'"),
        ("10.0.0.0/8 1_0", "invalid score '1_0'"),
        ("10.0.0.0/8 5.5", "invalid score '5.5'"),
        ("10.0.0.0/8 high", "invalid score 'high'"),
        ("10.0.0.0/8 \u0665", "invalid score"),  # an Arabic-Indic digit int() would take
        # field count
        ("10.0.0.0/8", "missing score after '10.0.0.0/8'"),
        ("10.0.0.0/8   # score forgotten", "missing score"),
        ("10.0.0.0/8 5 6", "expected 'CIDR SCORE', got 3 fields"),
        ("10.0.0.0 /8 5", "expected 'CIDR SCORE', got 3 fields"),
    ],
)
def test_malformed_line_reports_path_line_and_reason(
    tmp_path: Path, line: str, reason: str
) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(f"# header\n10.0.0.0/8 1\n\n{line}\n192.0.2.1 5\n")
    with pytest.raises(ReputationFileError) as info:
        ReputationTable.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}:4: ")
    assert reason in message
    assert "\n" not in message
    assert isinstance(info.value, ValueError)
    assert (info.value.source, info.value.lineno) == (str(path), 4)
    assert reason in info.value.reason


def test_from_lines_error_names_the_source() -> None:
    with pytest.raises(ReputationFileError, match=r"^<feed>:2: score 300 out of range"):
        ReputationTable.from_lines(["10.0.0.0/8 1", "10.0.0.0/8 300"], source="<feed>")
    with pytest.raises(ReputationFileError, match=r"^<lines>:1: missing score"):
        ReputationTable.from_lines(["10.0.0.0/8"])


def test_error_survives_pickling() -> None:
    with pytest.raises(ReputationFileError) as info:
        table("10.0.0.0/8 1", "10.0.0.1/8 2")
    copy = pickle.loads(pickle.dumps(info.value))
    assert (
        str(copy)
        == str(info.value)
        == "t:2: host bits set in '10.0.0.1/8' (did you mean 10.0.0.0/8?)"
    )
    assert (copy.source, copy.lineno, copy.reason) == ("t", 2, info.value.reason)


def test_undecodable_bytes_are_a_line_error(tmp_path: Path) -> None:
    path = tmp_path / "bin.txt"
    path.write_bytes(b"10.0.0.0/8 1\n10.0.0.\xff/8 2\n")
    with pytest.raises(ReputationFileError, match=r"bin\.txt:2: invalid IPv4 address"):
        ReputationTable.load(path)


def test_missing_file_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ReputationTable.load(tmp_path / "absent.txt")


# --- structure and reporting --------------------------------------------------------------------


def test_summary_and_len() -> None:
    tab = ReputationTable.from_lines(
        ["10.0.0.0/8 1", "10.0.0.0/8 2", "10.1.0.0/16 3", "2001:db8::/32 4"], source="feed.txt"
    )
    assert len(tab) == 3
    summary = tab.summary()
    assert "\n" not in summary
    assert summary.startswith("feed.txt: 3 prefixes (2 IPv4, 1 IPv6, 1 duplicates overridden)")
    assert "intervals" in summary
    assert "MiB" in summary
    assert tab.nbytes() > 0
    assert "feed.txt" in repr(tab)


def test_table_keeps_no_per_entry_objects() -> None:
    """After loading, only flat arrays and scalars remain (copy-on-write friendliness)."""
    rng = random.Random(7)
    lines = [
        f"{IPv4Address(rng.getrandbits(24) << 8)}/24 {rng.randrange(101)}" for _ in range(5000)
    ]
    lines += [f"{IPv6Address(rng.getrandbits(64) << 64)}/64 7" for _ in range(5000)]
    tab = ReputationTable.from_lines(lines)
    seen = 0
    families = [ref for ref in gc.get_referents(tab) if not isinstance(ref, (str, int, type))]
    assert len(families) == 2
    for family in families:
        for ref in gc.get_referents(family):
            if isinstance(ref, array):
                seen += len(ref)
            else:
                assert isinstance(ref, (int, bool, type(None), type)), type(ref)
    assert seen > 20000  # the intervals really live in the arrays


# --- property test against a naive reference -----------------------------------------------


class NaiveLPM:
    """Longest-prefix match the obvious way: try every prefix length, longest first.

    Built with ``ipaddress`` and dicts, nothing in common with the table's interval flattening.
    """

    def __init__(self, entries: list[tuple[int, int, int]], width: int) -> None:
        self.network = IPv4Network if width == 32 else IPv6Network
        self.by_length: dict[int, dict[IPv4Network | IPv6Network, int]] = {}
        for net, plen, value in entries:  # later duplicates override earlier ones
            self.by_length.setdefault(plen, {})[self.network((net, plen))] = value
        self.lengths = sorted(self.by_length, reverse=True)

    def __call__(self, addr: int) -> int | None:
        for plen in self.lengths:
            found = self.by_length[plen].get(self.network((addr, plen), strict=False))
            if found is not None:
                return found
        return None


@st.composite
def prefix_lists(draw: st.DrawFn, width: int) -> list[tuple[int, int, int]]:
    """Small prefix lists, clustered around an anchor so nesting and adjacency are common."""
    top = (1 << width) - 1
    anchor = draw(st.integers(0, top))
    entries = []
    for _ in range(draw(st.integers(0, 12))):
        plen = draw(
            st.one_of(
                st.integers(0, width), st.integers(width - 8, width), st.sampled_from([0, width])
            )
        )
        near = st.integers(0, 1023).map(lambda d: (anchor ^ d) & top)
        addr = draw(st.one_of(near, st.integers(0, top), st.just(anchor)))
        net = addr & ~((1 << (width - plen)) - 1) & top
        entries.append((net, plen, draw(st.integers(0, 100))))
    return entries


def to_line(net: int, plen: int, value: int, width: int, style: int) -> str:
    addr = IPv4Address(net) if width == 32 else IPv6Address(net)
    text = str(addr) if plen == width and style == 1 else f"{addr}/{plen}"
    return f"  {text}\t{value}  # entry" if style == 2 else f"{text} {value}"


def check_against_reference(
    v4: list[tuple[int, int, int]], v6: list[tuple[int, int, int]], extra: list[int], seed: int
) -> None:
    # Families interleaved at random, order within each family kept (duplicates: last wins).
    queues = [
        [to_line(n, p, s, 32, i % 3) for i, (n, p, s) in enumerate(v4)][::-1],
        [to_line(n, p, s, 128, i % 3) for i, (n, p, s) in enumerate(v6)][::-1],
    ]
    rng = random.Random(seed)
    lines = []
    while any(queues):
        lines.append(rng.choice([q for q in queues if q]).pop())
    tab = ReputationTable.from_lines(lines)
    for width, entries, lookup in ((32, v4, tab.lookup_v4), (128, v6, tab.lookup_v6)):
        reference = NaiveLPM(entries, width)
        top = (1 << width) - 1
        probes = {0, top, *(x & top for x in extra)}
        for net, plen, _ in entries:
            last = net | ((1 << (width - plen)) - 1)
            probes.update(
                p for p in (net - 1, net, net + 1, last - 1, last, last + 1) if 0 <= p <= top
            )
        for addr in probes:
            assert lookup(addr) == reference(addr), (width, hex(addr), lines)


@settings(max_examples=300, deadline=None)
@given(
    v4=prefix_lists(32),
    v6=prefix_lists(128),
    extra=st.lists(st.integers(0, (1 << 128) - 1), max_size=8),
    seed=st.integers(0, 1000),
)
def test_matches_naive_reference(
    v4: list[tuple[int, int, int]], v6: list[tuple[int, int, int]], extra: list[int], seed: int
) -> None:
    check_against_reference(v4, v6, extra, seed)


def test_matches_naive_reference_many_buckets() -> None:
    """Enough prefixes to spread over many index buckets (hypothesis keeps tables tiny)."""
    rng = random.Random(1234)
    for width, plens, cluster in (
        (32, [8, 12, 16, 20, 24, 28, 32], 10 << 24),
        (128, [16, 32, 48, 64, 96, 127, 128], 0x20010DB8 << 96),
    ):
        entries = []
        for _ in range(3000):
            plen = rng.choice(plens)
            # Half uniform, half inside one /8 or /32, so some buckets are crowded.
            addr = rng.getrandbits(width) if rng.random() < 0.5 else cluster | rng.getrandbits(24)
            entries.append((addr >> (width - plen) << (width - plen), plen, rng.randrange(101)))
        tab = ReputationTable.from_lines(to_line(n, p, s, width, 0) for n, p, s in entries)
        lookup = tab.lookup_v4 if width == 32 else tab.lookup_v6
        reference = NaiveLPM(entries, width)
        for net, plen, _ in rng.sample(entries, 500):
            last = net | ((1 << (width - plen)) - 1)
            for addr in (net - 1, net, last, last + 1, rng.randint(net, last)):
                if 0 <= addr < 1 << width:
                    assert lookup(addr) == reference(addr), hex(addr)


# --- scale -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_million_ipv4_entries(tmp_path: Path) -> None:
    """1M distinct /24s under a /0 default, a few /32 overrides; answers checked on a sample."""
    rng = random.Random(2024)
    nets24 = rng.sample(range(1 << 24), 1_000_000)
    scores24 = {net: i % 101 for i, net in enumerate(nets24)}
    hosts = {rng.choice(nets24) << 8 | rng.randrange(256): rng.randrange(101) for _ in range(100)}
    ntoa = socket.inet_ntoa
    path = tmp_path / "million.txt"
    with path.open("w") as f:
        f.write("0.0.0.0/0 3\n")
        f.writelines(
            f"{ntoa((net << 8).to_bytes(4, 'big'))}/24 {i % 101}\n" for i, net in enumerate(nets24)
        )
        f.writelines(f"{ntoa(h.to_bytes(4, 'big'))} {s}\n" for h, s in hosts.items())

    tab = ReputationTable.load(path)

    assert len(tab) == 1 + 1_000_000 + len(hosts)

    def expected(addr: int) -> int:
        if addr in hosts:
            return hosts[addr]
        return scores24.get(addr >> 8, 3)

    sample = [rng.getrandbits(32) for _ in range(5000)]
    sample += [net << 8 | rng.randrange(256) for net in rng.sample(nets24, 5000)]
    sample += [net << 8 for net in rng.sample(nets24, 1000)]
    sample += [net << 8 | 255 for net in rng.sample(nets24, 1000)]
    sample += list(hosts)
    sample += [h + d for h in hosts for d in (-1, 1)]
    for addr in sample:
        assert tab.lookup_v4(addr) == expected(addr)
