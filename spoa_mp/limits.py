"""The protocol's frame-size limits, for the code that must not load the C
codec (configuration, command-line help, the tools). csrc/spop.h holds the
same numbers for C; spoa_mp.codec exposes those, and a test keeps the two
equal (tests/test_limits.py)."""

from __future__ import annotations

MIN_FRAME_SIZE = 256  # SPOP_MIN_FRAME_SIZE: the smallest max-frame-size either side may ask for
DEFAULT_FRAME_SIZE = 16380  # SPOP_DEFAULT_FRAME_SIZE: HAProxy's tune.bufsize (16384) - 4
MAX_FRAME_SIZE = 1 << 24  # SPOP_MAX_FRAME_SIZE: what we buffer per frame
