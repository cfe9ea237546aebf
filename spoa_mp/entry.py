"""The `spoa-mp` console script: `spoa-mp send` goes straight to its module,
so a one-shot client does not import the server's configuration machinery
(its start-up time is most of what `send` costs); everything else is cli.py."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["send"]:
        from spoa_mp.send import main as send_main  # noqa: PLC0415 - the point of this module

        return send_main(args[1:])
    from spoa_mp.cli import main as cli_main  # noqa: PLC0415

    return cli_main(args)
