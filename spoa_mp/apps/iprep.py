"""The default agent: IP reputation, what HAProxy's `spoa.c` example does.

HAProxy sends message `check-client-ip` with the client address; the agent
answers with `set-var(sess.<prefix>.ip_score)` (0..100)::

    spoe-message check-client-ip
        args src                 # or: args ip=src
        event on-client-session

Without a reputation file the score is uniformly random in 0..100
*inclusive*, as spoa.c's README describes (spoa.c itself computes
`random() % 100`, so it never sends 100). With a file (see
`spoa_mp.reputation` for the format) the score is that of the longest
listed prefix containing the address, or `default_score` when none does.
IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are looked up as IPv4.

There is no module-level agent: it needs configuration, so the server calls
`make_agent(...)` in the supervisor, before forking; the table it loads is
then shared by the workers copy-on-write.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address

from spoa_mp.agent import Agent
from spoa_mp.model import Action, Message, Scope, Value, set_var
from spoa_mp.reputation import MAX_SCORE

__all__ = ["MESSAGE", "make_agent"]

log = logging.getLogger(__name__)

MESSAGE = "check-client-ip"
_MAPPED_V4 = 0xFFFF  # ::ffff:0:0/96 shifted right by 32 bits


def _address(msg: Message) -> Value:
    """The argument named "ip" if there is one, else the first argument.

    Handlers call it only for nargs != 1: with one argument (`args src` or
    `args ip=src`) both rules give msg[0], without a name lookup.
    """
    if msg.nargs == 0:
        return None
    try:
        return msg["ip"]
    except KeyError:
        return msg[0]


def make_agent(
    reputation_file: str | None = None,
    default_score: int = 100,
    var_name: str = "ip_score",
    scope: Scope | str = "sess",
    seed: int | None = None,
    blocklists: Sequence[tuple[str, int]] = (),
) -> Agent:
    """Build the IP-reputation agent.

    `reputation_file`: CIDR -> score file, loaded now (ReputationFileError,
    OSError); None for random scores. `default_score`: the score of unlisted
    addresses. `var_name`/`scope`: the variable set (ValueError when
    invalid). `seed`: fixes the random sequence (tests); otherwise every
    worker reseeds from the OS after the fork. `blocklists`: (file, score)
    pairs (spoa_mp.blocklist), in one table with the reputation file; with
    blocklists and no reputation file, unlisted addresses get `default_score`.
    A message whose address
    argument is missing, NULL or not an IP address gets no action.

    >>> agent = make_agent(seed=1)
    >>> sorted(agent.handlers)
    ['check-client-ip']
    """
    if default_score.__class__ is not int or not 0 <= default_score <= MAX_SCORE:
        raise ValueError(f"default_score must be an int in 0..{MAX_SCORE}: {default_score!r}")
    # Every possible answer, built once: a handler result is a list lookup,
    # and the codec encodes each of these at most once per process (it caches
    # the bytes on the Action, and a batch of Actions is encoded in one pass).
    results: list[Action] = [set_var(scope, var_name, s) for s in range(MAX_SCORE + 1)]

    agent = Agent("iprep")

    if reputation_file is None and not blocklists:
        rng = random.Random(seed)
        rand = rng.random

        @agent.on_message(MESSAGE)
        def check_client_ip_random(msg: Message) -> Action | None:
            addr = msg[0] if msg.nargs == 1 else _address(msg)
            cls = addr.__class__
            if cls is not IPv4Address and cls is not IPv6Address:
                return None  # NULL (HAProxy had no address), or not an address
            # floor(U[0,1) * 101) is uniform on 0..100 (to 2**-53), and
            # cheaper than randint.
            return results[int(rand() * 101)]

        if seed is None:

            @agent.on_worker_start
            def reseed() -> None:
                # Forked workers inherit the supervisor's generator state:
                # without this they would all send the same score sequence.
                rng.seed()

        return agent

    from spoa_mp.blocklist import load_table  # noqa: PLC0415 - only with a table

    table = load_table(reputation_file, blocklists)
    log.info("reputation table %s", table.summary())
    lookup_v4, lookup_v6 = table.lookup_v4, table.lookup_v6
    default = results[default_score]

    @agent.on_message(MESSAGE)
    def check_client_ip(msg: Message) -> Action | None:
        addr = msg[0] if msg.nargs == 1 else _address(msg)
        # Exact classes (what Message returns) and `_ip`, the int that int()
        # would return through a Python-level __int__: this is the per-message
        # path. spoa_mp.model relies on `_ip` as well.
        if type(addr) is IPv4Address:
            score = lookup_v4(addr._ip)  # type: ignore[attr-defined]  # private: not in typeshed
        elif type(addr) is IPv6Address:
            num = addr._ip  # type: ignore[attr-defined]  # private: not in typeshed
            score = lookup_v4(num & 0xFFFFFFFF) if num >> 32 == _MAPPED_V4 else lookup_v6(num)
        else:
            return None  # NULL (HAProxy had no address), or not an address
        return default if score is None else results[score]

    return agent
