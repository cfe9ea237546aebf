"""`restored_logging()`: what spoa_mp.logs.setup_logging() and the CLI's
main() change in this process (the root logger's handlers and level, the
process role, sys.excepthook, warnings capture), put back afterwards."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from spoa_mp import logs


@contextlib.contextmanager
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level, role, hook = root.handlers[:], root.level, logs.get_role(), sys.excepthook
    try:
        yield
    finally:
        if logs._handler is not None and logs._handler not in handlers:
            root.removeHandler(logs._handler)
            logs._handler.close()
        logs._handler = None
        root.handlers[:] = handlers
        root.setLevel(level)
        logs.set_role(role)
        sys.excepthook = hook
        logging.captureWarnings(False)
