"""Op benchmark (see torchmoe/bench.py): `python benchmarks/bench_ops.py [--device cuda] [--quick]`."""
from torchmoe.bench import main

if __name__ == "__main__":
    main()
