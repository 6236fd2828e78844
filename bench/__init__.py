"""reaper's benchmarks: each module is a script that prints its figures (`make bench` runs all)."""
