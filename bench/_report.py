"""The start and the end every comparison bench script shares: SIGTERM as
Ctrl-C, the command line, the rounds in a temporary folder, and the report
(JSON on stdout, or the table, its legend and the command)."""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def start(argv: list[str] | None, json_out: bool) -> tuple[str, TextIO]:
    """SIGTERM raises KeyboardInterrupt; returns the command line and where
    progress goes (stderr when stdout carries JSON)."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv)
    return command, sys.stderr if json_out else sys.stdout


def run_rounds(prefix: str, rounds: Callable[[Path], None]) -> bool:
    """rounds(tmp) in a fresh temporary folder, removed after; False on Ctrl-C."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        rounds(tmp)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def report(
    json_out: bool,
    info: dict[str, Any],
    rows: list[dict[str, Any]],
    runs: Sequence[Any],
    print_table: Callable[[], None],
    legend: str,
) -> None:
    """JSON (info, summary, runs) on stdout, or the table, its legend and the command."""
    if json_out:
        json.dump(
            {"info": info, "summary": rows, "runs": [asdict(r) for r in runs]}, sys.stdout, indent=2
        )
        print()
    else:
        print()
        print_table()
        print()
        print(legend)
        print(f"command: {info['command']}")
