"""TLS for the agent's listeners: the server ``ssl.SSLContext`` and the checks
of its files.

``--tls-cert FILE --tls-key FILE`` make every listener speak TLS 1.2 or later;
``--tls-client-ca FILE`` also requires a client certificate signed by that CA
(mutual TLS: HAProxy's ``crt`` on the agents' server line). The supervisor
builds the context (at start and on SIGHUP, keeping the old one when the new
files are bad) and its workers, forked after, wrap each accepted connection
with it: they share its session-ticket keys, so HAProxy resumes a session on
whichever worker takes the next connection.

:func:`check_files` is what ``check-config`` and the reload run: every problem
of the files as one line each (unreadable, not PEM, key not matching the
certificate, expired or not yet valid).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spoa_mp.config import ServerConfig

__all__ = [
    "FLAGS",
    "TLSError",
    "TLSFiles",
    "build_server_context",
    "check_files",
    "file_problems",
    "server_context_for",
]


class TLSError(ValueError):
    """A TLS file cannot be used; ``str()`` is one line naming the file."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """The PEM files of a TLS listener (paths absolute, as the config stores them)."""

    cert: str
    key: str
    client_ca: str | None = None


def _ssl_reason(e: ssl.SSLError) -> str:
    """'key values mismatch' rather than '[X509: KEY_VALUES_MISMATCH] key values
    mismatch (_ssl.c:3927)'."""
    reason = getattr(e, "reason", None)
    if isinstance(reason, str) and reason:
        return reason.lower().replace("_", " ")
    return " ".join(str(e).split())


def _readable(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
    except OSError as e:
        return f"{path} cannot be read: {e.strerror or e}"
    if b"-----BEGIN " not in head:
        return f"{path} is not PEM (no '-----BEGIN' line)"
    return None


# ssl has no public way to read a certificate file's dates; CPython's own
# tests use this function, present since 3.3. Without it, dates go unchecked.
_decode_cert: Callable[[str], dict[str, Any]] | None = getattr(
    getattr(ssl, "_ssl", None), "_test_decode_cert", None
)


def _dates_problem(decoded: dict[str, Any], path: str, now: float) -> str | None:
    try:
        not_before = ssl.cert_time_to_seconds(decoded["notBefore"])
        not_after = ssl.cert_time_to_seconds(decoded["notAfter"])
    except (KeyError, ValueError):
        return None
    if now > not_after:
        return f"{path} expired on {decoded['notAfter']}"
    if now < not_before:
        return f"{path} is not valid before {decoded['notBefore']}"
    return None


def _cert_dates(path: str, now: float) -> str | None:
    if _decode_cert is None:  # pragma: no cover - not CPython
        return None
    try:
        decoded = _decode_cert(path)
    except ssl.SSLError as e:
        return f"{path} is not a certificate: {_ssl_reason(e)}"
    except OSError as e:
        return f"{path} cannot be read: {e.strerror or e}"
    return _dates_problem(decoded, path, now)


FLAGS = {"cert": "--tls-cert", "key": "--tls-key", "client_ca": "--tls-client-ca"}


def file_problems(files: TLSFiles, now: float | None = None) -> list[tuple[str, str]]:
    """Every problem with `files` as (which, reason) pairs, `which` one of
    "cert", "key", "client_ca" (FLAGS names their flags) and `reason` a phrase
    starting with the path; [] when a context can be built."""
    now = time.time() if now is None else now
    problems = []
    named = [("cert", files.cert), ("key", files.key)]
    if files.client_ca is not None:
        named.append(("client_ca", files.client_ca))
    for which, path in named:
        reason = _readable(path)
        if reason:
            problems.append((which, reason))
    if problems:
        return problems
    reason = _cert_dates(files.cert, now)
    if reason:
        problems.append(("cert", reason))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(files.cert, files.key)
    except ssl.SSLError as e:
        why = _ssl_reason(e)
        if "mismatch" in why:
            problems.append(("key", f"{files.key} does not match the certificate {files.cert}"))
        else:
            problems.append(("key", f"{files.key} (with {files.cert}): {why}"))
    if files.client_ca is not None:
        problems += [("client_ca", r) for r in _ca_problems(files.client_ca, now)]
    return problems


def check_files(files: TLSFiles, now: float | None = None) -> list[str]:
    """Every problem with `files`, one line each, naming the flag; []: usable."""
    return [f"{FLAGS[which]} {reason}" for which, reason in file_problems(files, now)]


def _ca_problems(path: str, now: float) -> list[str]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as e:
        return [f"{path}: {_ssl_reason(e)}"]
    cas = context.get_ca_certs()
    if not cas:
        return [f"{path} holds no CA certificate"]
    problems = []
    for ca in cas:
        reason = _dates_problem(ca, path, now)
        if reason:
            problems.append(reason)
    # one valid CA among expired ones still verifies clients
    return problems if len(problems) == len(cas) else []


def build_server_context(files: TLSFiles) -> ssl.SSLContext:
    """The listeners' context: TLS >= 1.2, the certificate and key, and with a
    client CA, a verified client certificate required. Raises TLSError."""
    problems = check_files(files)
    if problems:
        raise TLSError(problems[0])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # a renegotiation would make a read want a write: the worker never needs one
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(files.cert, files.key)
        if files.client_ca is not None:
            context.load_verify_locations(cafile=files.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as e:  # changed between the check and now
        raise TLSError(f"--tls-cert {files.cert}: {e}") from None
    return context


def files_of(config: ServerConfig) -> TLSFiles | None:
    """The TLS files a configuration names; None: the listeners are plain."""
    if not config.tls_cert or not config.tls_key:
        return None
    return TLSFiles(config.tls_cert, config.tls_key, config.tls_client_ca)


def server_context_for(config: ServerConfig) -> ssl.SSLContext | None:
    """The listeners' context for `config` (None without TLS); raises TLSError."""
    files = files_of(config)
    return None if files is None else build_server_context(files)


def settings_problem(cert: object, key: object, client_ca: object) -> tuple[str, str] | None:
    """What is wrong with the tls-* settings taken together, as (setting,
    reason), the setting "tls_cert", "tls_key" or "tls_client_ca"; None when
    they are fine or absent."""
    if bool(cert) != bool(key):
        return ("tls_cert", "needs --tls-key too") if cert else ("tls_key", "needs --tls-cert too")
    if client_ca and not cert:
        return "tls_client_ca", "needs --tls-cert and --tls-key"
    if not cert:
        return None
    assert isinstance(cert, str)
    assert isinstance(key, str)
    files = TLSFiles(cert, key, client_ca if isinstance(client_ca, str) else None)
    problems = file_problems(files)
    return (f"tls_{problems[0][0]}", problems[0][1]) if problems else None
