"""The parts of ``tools/benchmark.py``: shared machinery, neighborhood attention, linear attention and models."""
