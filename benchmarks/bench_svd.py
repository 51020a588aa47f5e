"""Print the batched randomized SVD benchmark table (CUDA): the same run as `fasttrunc bench svd`.

    python benchmarks/bench_svd.py                 # table on stdout, progress on stderr
    python benchmarks/bench_svd.py --json          # JSON only
    python benchmarks/bench_svd.py --out DIR       # also DIR/results.json

Every option of `fasttrunc bench svd` is accepted (see --help). The torch baselines are timed in
the same run, on the same card; copy the table into benchmarks/RESULTS.md with the card's name.
"""

import sys

from fasttrunc.cli.main import app

if __name__ == "__main__":
    app(["bench", "svd", *sys.argv[1:]])
