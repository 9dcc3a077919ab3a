"""`python -m bench` until `mailq bench` is registered."""

from bench.cli import bench

bench(prog_name="mailq bench")
