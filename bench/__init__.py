"""Benchmarks, each run as a script (`python bench/<name>.py`, or all with `make bench`); their
latest figures are kept in bench/results/."""
