"""The tests' shared tools, one module a job:

* `waits`: loopback ports and bounded, polling waits (`wait_for`).
* `processes`: `Process`, a child in its own session with its output in
  files, stopped by its pid and its process group (the bench scripts use it
  too: bench/_procs.py puts tests/ on sys.path).
* `spop_peer`: `SpopClient`, HAProxy's side of one SPOP connection over a
  real socket (`handshaken`: after its HELLO), and the frame vectors of
  tests/data/spop-vectors.json.
* `server`: `Server`, `python -m spoa_mp` as a context manager.
* `apps`: `TEST_APP`, the handlers servers load (fast, boom, hang, slow).
* `haproxy`: the HAProxy binaries, their configuration and `HAProxy`, the
  one HAProxy runner.
* `load`: load generators (`spoa-mp bench`, wrk) and their output, and
  `LoadDriver`, SPOP connections in threads that time every ACK.
* `redis_server`: `RedisServer`, a real redis-server (the bench scripts use
  it too).

Shared fixtures are in tests/conftest.py.
"""
