"""An example agent backed by Redis, the store that several agent hosts share.

Three agents with the same messages, one per style::

    SPOA_REDIS_URL=redis://127.0.0.1:6379/0 spoa-mp --app redis_scores:per_message
    SPOA_REDIS_URL=unix:///run/redis/redis.sock spoa-mp --app redis_scores:batched
    spoa-mp --app redis_scores:coalesced

(from the directory that holds redis_scores.py; `pip install 'spoa-mp[redis]'`).
HAProxy side, with `option var-prefix iprep`::

    spoe-message check-client-ip
        args ip=src
        event on-frontend-http-request
    spoe-message count-request
        args ip=src
        event on-frontend-http-request

- `check-client-ip` sets `sess.iprep.ip_score` to the score another process
  wrote in Redis under `iprep:<ip>` (`redis-cli SET iprep:192.0.2.7 5`; the
  address as Python prints it: dotted quad, compressed IPv6), clamped to
  0..100; DEFAULT_SCORE when the key is missing or not an integer.
- `count-request` counts the client's requests for rate limiting: INCR
  `rate:<ip>` and EXPIRE it after RATE_WINDOW seconds (NX: the window starts
  at the first request), in one pipeline; sets `txn.iprep.req_count`.

Which style:

- `per_message`: one `async def` per message, one round trip each. The
  simplest code, and a message waits for nothing but its own reply. Each
  command costs the client tens of microseconds of CPU: right up to a few
  ten thousand messages a second per host.
- `coalesced`: per-message code as in `per_message`, but the GETs asked
  for in one turn of the event loop leave as one MGET (CoalescedGets): most
  of `batched`'s throughput, with a handler that sees one message. Its
  messages share a round trip and, if Redis fails, the fallback.
- `batched`: `on_batch` gets every message of a name that one read of a
  connection brought (HAProxy pipelines NOTIFYs under load) and serves them
  with one MGET / one pipeline: one round trip and one command's overhead for
  the lot, several times the throughput (its MGET also joins those of the
  other reads of the same loop turn, through CoalescedGets). The batch
  shares one deadline and one fate: if Redis fails, every message of it gets
  the fallback. The fastest style, for code that can take a list.

Failure: fail open. Each message has TIMEOUT seconds (SPOA_REDIS_TIMEOUT,
default 0.05) from the NOTIFY's arrival to its ACK. A hung Redis runs into
the deadline (the handler is cancelled; redis-py then drops that connection)
and a dead one makes the client raise at once; both are answered with the
fallback: DEFAULT_SCORE, and no count (no count = not limited). The client
never retries (the deadline leaves no time for it) and its socket timeouts
bound what the deadline does not (connecting, a server without deadlines).
"""

from __future__ import annotations

import asyncio
import os
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from spoa_mp.agent import Agent
from spoa_mp.model import Action, Message, set_var

REDIS_URL = os.environ.get("SPOA_REDIS_URL", "redis://127.0.0.1:6379/0")
TIMEOUT = float(os.environ.get("SPOA_REDIS_TIMEOUT", "0.05"))  # a bad value fails at startup
SOCKET_TIMEOUT = 0.25  # a backstop: the deadline normally ends a wait first
MAX_CONNECTIONS = 128  # per worker; past it a command fails at once (and falls back)
RATE_WINDOW = 60  # seconds
DEFAULT_SCORE = 100  # unknown addresses are trusted: fail open
MAX_SCORE = 100

SCORES = [set_var("sess", "ip_score", s) for s in range(MAX_SCORE + 1)]  # built once
FALLBACK = SCORES[DEFAULT_SCORE]

per_message = Agent("redis-scores")
batched = Agent("redis-scores-batched")
coalesced = Agent("redis-scores-coalesced")


class _State:
    client: Redis | None = None


_state = _State()


def connect(url: str | None = None) -> Redis:
    """Open this process's client (lazily: no connection until the first
    command, so a worker starts even while Redis is down)."""
    _state.client = Redis.from_url(
        url or REDIS_URL,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
        max_connections=MAX_CONNECTIONS,
    )
    return _state.client


async def close() -> None:
    """Close this process's client (tests; workers just exit)."""
    client, _state.client = _state.client, None
    if client is not None:
        await client.aclose()


def _client() -> Redis:
    client = _state.client
    if client is None:
        raise RuntimeError("no Redis client: connect() runs in each worker at start")
    return client


@per_message.on_worker_start
@batched.on_worker_start
@coalesced.on_worker_start
def _open_client() -> None:
    """After the fork: a client (and its sockets) must not be shared between processes."""
    connect()


# ---------------------------------------------------------------- helpers


def client_ip(msg: Message) -> IPv4Address | IPv6Address | None:
    """The `ip` argument (or the only argument); IPv4-mapped IPv6 as IPv4;
    None when it is missing or not an address."""
    ip = msg[0] if msg.nargs == 1 else msg.get("ip")
    if ip.__class__ is IPv4Address:
        return ip  # type: ignore[return-value]
    if ip.__class__ is IPv6Address:
        return ip.ipv4_mapped or ip  # type: ignore[union-attr,return-value]
    return None


def score_action(raw: bytes | None) -> Action:
    """The set-var of a stored score: clamped to 0..100; DEFAULT_SCORE when
    missing or not an integer."""
    if raw is None:
        return FALLBACK
    try:
        score = int(raw)
    except ValueError:
        return FALLBACK
    return SCORES[min(max(score, 0), MAX_SCORE)]


def count_action(count: int) -> Action:
    return set_var("txn", "req_count", count)


# ------------------------------------------------------- one message at a time


@per_message.on_message("check-client-ip", timeout=TIMEOUT, on_timeout=FALLBACK, on_error=FALLBACK)
async def check_client_ip(msg: Message) -> Action | None:
    ip = client_ip(msg)
    if ip is None:
        return None
    return score_action(await _client().get(f"iprep:{ip}"))


@per_message.on_message("count-request", timeout=TIMEOUT)
async def count_request(msg: Message) -> Action | None:
    ip = client_ip(msg)
    if ip is None:
        return None
    key = f"rate:{ip}"
    pipe = _client().pipeline(transaction=False)
    pipe.incr(key)
    pipe.expire(key, RATE_WINDOW, nx=True)
    count, _ = await pipe.execute()
    return count_action(count)


# ---------------------------------------------------------- a read at a time


@batched.on_batch("check-client-ip", timeout=TIMEOUT, on_timeout=FALLBACK, on_error=FALLBACK)
async def check_client_ips(msgs: list[Message]) -> list[Action | None]:
    ips = [client_ip(m) for m in msgs]
    keys = [f"iprep:{ip}" for ip in ips if ip is not None]
    if not keys:
        return [None] * len(msgs)
    raws = iter(await _gets.get_many(keys))
    return [None if ip is None else score_action(next(raws)) for ip in ips]


@batched.on_batch("count-request", timeout=TIMEOUT)
async def count_requests(msgs: list[Message]) -> list[Action | None]:
    ips = [client_ip(m) for m in msgs]
    pipe = _client().pipeline(transaction=False)
    for ip in ips:
        if ip is not None:
            key = f"rate:{ip}"
            pipe.incr(key)
            pipe.expire(key, RATE_WINDOW, nx=True)
    if not len(pipe):
        return [None] * len(msgs)
    counts = iter((await pipe.execute())[::2])
    return [None if ip is None else count_action(next(counts)) for ip in ips]


# ------------------------------------------- per message, one MGET per loop turn


class CoalescedGets:
    """GETs asked for during one turn of the event loop, sent as one MGET
    (what other clients call auto-pipelining). The dispatcher runs a read's
    handlers eagerly, and every read of one wakeup in the same turn: their
    GETs leave together, after the turn."""

    def __init__(self) -> None:
        self._keys: list[str] = []
        # (waiter, first key, number of keys; None: one key, not a list)
        self._waiters: list[tuple[asyncio.Future[Any], int, int | None]] = []
        self._flushes: set[asyncio.Task[None]] = set()  # strong references

    def get(self, key: str) -> asyncio.Future[bytes | None]:
        """The value of key (a future)."""
        waiter = self._waiter(len(self._keys), None)
        self._keys.append(key)
        return waiter

    def get_many(self, keys: list[str]) -> asyncio.Future[list[bytes | None]]:
        """The values of keys, in order (a future)."""
        waiter = self._waiter(len(self._keys), len(keys))
        self._keys += keys
        return waiter

    def _waiter(self, first: int, n: int | None) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        if not self._waiters:
            loop.call_soon(self._flush)
        waiter: asyncio.Future[Any] = loop.create_future()
        self._waiters.append((waiter, first, n))
        return waiter

    def _flush(self) -> None:
        keys, waiters = self._keys, self._waiters
        self._keys, self._waiters = [], []
        task = asyncio.ensure_future(self._mget(keys, waiters))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    @staticmethod
    async def _mget(
        keys: list[str], waiters: list[tuple[asyncio.Future[Any], int, int | None]]
    ) -> None:
        try:
            raws = await _client().mget(keys) if keys else []
        except Exception as e:  # each waiter's handler raises it: on_error
            for w, _, _ in waiters:
                if not w.done():  # a waiter past its deadline was cancelled
                    w.set_exception(e)
            return
        for w, first, n in waiters:
            if not w.done():
                w.set_result(raws[first] if n is None else raws[first : first + n])


_gets = CoalescedGets()


@coalesced.on_message("check-client-ip", timeout=TIMEOUT, on_timeout=FALLBACK, on_error=FALLBACK)
async def check_client_ip_coalesced(msg: Message) -> Action | None:
    ip = client_ip(msg)
    if ip is None:
        return None
    return score_action(await _gets.get(f"iprep:{ip}"))


coalesced.add_handler("count-request", count_request, timeout=TIMEOUT)
