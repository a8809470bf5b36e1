"""Side-by-side measurements of trainfleet against its peers (python benchmarks/run.py)."""
