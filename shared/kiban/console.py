"""The ``kiban`` console script, installed with every extra; the command itself needs ``cli``.

Like httpx's ``httpx`` script: a worker image that installed only its service's extra still
has the script, and running it says what to install instead of failing with a traceback.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from kiban_cli.main import app
    except ImportError as exc:
        print(
            f"kiban: the command line needs the 'cli' extra (pip install 'kiban[cli]'): {exc}",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    app()
