"""A test kit for agents: test handlers the way the server runs them.

``AgentClient`` is HAProxy's side of a connection, in-process: each message
goes through the real protocol core and dispatcher, so sync, coroutine,
batch, blocking and deadline handlers behave as they do in a worker (no
sockets, no processes)::

    from spoa_mp.testing import AgentClient

    def test_blocked():
        with AgentClient(agent) as client:
            result = client.send("check-client-ip", ip=IPv4Address("192.0.2.1"))
        assert result.actions == [set_var("sess", "ip_score", 0)]
        assert result["sess.ip_score"] == 0

``serve()`` starts a real ``spoa-mp`` on a free 127.0.0.1 port for the time
of a ``with`` block and talks SPOP to it::

    with serve("myagent:agent", workers=2) as server:
        assert server.send("check-client-ip", ip=IPv4Address("192.0.2.1"))["sess.ip_score"] == 0

Arguments are typed as HAProxy types its samples: int -> INT64, str ->
STRING, bytes -> BINARY, bool, None (NULL), ipaddress addresses; pass
spoa_mp.model types (Int32, UInt32, String, ...) to pick one. Pytest
fixtures making both: ``pytest_plugins = ["spoa_mp.testing_pytest"]``.
"""

from spoa_mp.testing_client import AgentClient, Msg, Result, notify_args, reply_actions
from spoa_mp.testing_server import RunningAgent, ServeTimeouts, SpoaError, serve

__all__ = [
    "AgentClient",
    "Msg",
    "Result",
    "RunningAgent",
    "ServeTimeouts",
    "SpoaError",
    "notify_args",
    "reply_actions",
    "serve",
]
