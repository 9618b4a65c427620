"""Command line: ``python -m torchmoe <command> [options]`` (also the ``torchmoe`` console script).

Commands:
  demo   train a small character-level MoE language model and show what torchmoe does
  bench  run the op benchmark and print its table
  info   print versions, kernels, CPU paths and environment knobs (attach it to a bug report)
"""
import sys
from typing import List, Optional

USAGE = """usage: python -m torchmoe <command> [options]

commands:
  demo   train a small character-level MoE transformer (makeMoE-style) on the Python
         standard library's docstrings: progress bar, losses, tokens/s, expert load,
         a PNG, a checkpoint round trip and a generated sample
  bench  benchmark the ops against plain-PyTorch composites and print the table
  info   print what a bug report needs: torchmoe, torch and Python versions, the
         kernels the library holds (CUDA archs, the CPU paths chosen on this CPU),
         the environment knobs and their values, the CPU and thread counts
         (--json: the same as JSON)

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
    if command == "info":
        import json

        import torchmoe

        if rest and rest[0] in ("-h", "--help"):
            print("usage: python -m torchmoe info [--json]")
            return 0
        unknown = [a for a in rest if a != "--json"]
        if unknown:
            print(f"torchmoe info: unknown argument {unknown[0]!r} (usage: python -m torchmoe info [--json])",
                  file=sys.stderr)
            return 2
        if "--json" in rest:
            print(json.dumps(torchmoe.info(as_dict=True), indent=2))
        else:
            print(torchmoe.info())
        return 0
    if command == "bench":
        from torchmoe import bench

        return bench.main(rest) or 0
    print(f"torchmoe: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
