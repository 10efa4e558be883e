"""Command line: ``python -m goheap demo``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m goheap", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="a narrated tour of goheap on real memory")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from goheap import demo

        return demo.main([])
    return 2


if __name__ == "__main__":
    sys.exit(main())
