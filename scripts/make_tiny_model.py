#!/usr/bin/env python
"""Build qlora-kit's built-in tiny model offline: a random-weight transformer from a transformers
config and a byte-level BPE tokenizer trained locally with `tokenizers` on the bundled sample data.

    python scripts/make_tiny_model.py                     # into the cache, prints the path
    python scripts/make_tiny_model.py --name tiny-chat --out /tmp/tiny-chat

`--base-model builtin:tiny` builds the same model on first use; this script is for looking at it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qlora_kit import tiny  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="tiny", choices=["tiny", "tiny-chat"])
    ap.add_argument("--out", type=Path, help="write here instead of the cache")
    args = ap.parse_args()
    if args.out:
        if args.out.exists() and any(args.out.iterdir()):
            sys.exit(f"error: {args.out} exists and is not empty")
        tiny.build(args.name, args.out)
        print(args.out)
    else:
        print(tiny.ensure(args.name))


if __name__ == "__main__":
    main()
