"""`python -m tests.bench` (what `make bench` runs), from the repository root."""

from tests.bench.cli import bench

bench(prog_name="python -m tests.bench")
