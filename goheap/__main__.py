"""Command line: ``goheap`` (the console script) and ``python -m goheap``: goheap/cli.py."""

from __future__ import annotations

import sys

from goheap.cli import main

if __name__ == "__main__":
    sys.exit(main())
