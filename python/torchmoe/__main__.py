"""Command line: ``python -m torchmoe <command> [options]`` (also the ``torchmoe`` console script).

Commands:
  demo   train a small character-level MoE language model and show what torchmoe does
  bench  run the op benchmark and print its table
"""
import sys
from typing import List, Optional

USAGE = """usage: python -m torchmoe <command> [options]

commands:
  demo   train a small character-level MoE transformer (makeMoE-style) on the Python
         standard library's docstrings: progress bar, losses, tokens/s, expert load,
         a PNG, a checkpoint round trip and a generated sample
  bench  benchmark the ops against plain-PyTorch composites and print the table

`python -m torchmoe <command> --help` lists a command's options."""


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    # Imported on demand: each command pulls in only what it needs.
    if command == "demo":
        from torchmoe.demo import main as demo_main

        return demo_main(rest)
    if command == "bench":
        from torchmoe import bench

        return bench.main(rest) or 0
    print(f"torchmoe: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
