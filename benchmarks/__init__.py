"""Speed and memory benchmarks: each prints a table last and writes JSON."""
