"""The frame-size limits: spoa_mp.limits (pure Python, for the configuration
and the tools) says what csrc/spop.h says (through the codec)."""

from __future__ import annotations

import subprocess
import sys

from spoa_mp import codec, config, haproxy_config, limits


def test_python_limits_are_the_c_limits() -> None:
    assert limits.MIN_FRAME_SIZE == codec.MIN_FRAME_SIZE
    assert limits.DEFAULT_FRAME_SIZE == codec.DEFAULT_FRAME_SIZE
    assert limits.MAX_FRAME_SIZE == codec.MAX_FRAME_SIZE


def test_defaults_come_from_the_limits() -> None:
    assert config.ServerConfig().max_frame_size == limits.DEFAULT_FRAME_SIZE
    assert haproxy_config.HAPROXY_DEFAULT_MAX_FRAME_SIZE == limits.DEFAULT_FRAME_SIZE


def test_the_tools_do_not_load_the_server() -> None:
    for tool in ("spoa_mp.check_config", "spoa_mp.haproxy_config", "spoa_mp.cli"):
        code = (
            f"import sys, {tool}; "
            "print(' '.join(m for m in ('spoa_mp.worker', 'spoa_mp.codec', 'spoa_mp._spop', "
            "'spoa_mp.supervisor', 'spoa_mp.metrics_http') if m in sys.modules))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == "", f"{tool} imports {out.stdout.strip()}"
