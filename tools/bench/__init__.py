"""The parts of ``tools/benchmark.py``: shared machinery, neighborhood attention, linear attention, block-sparse
attention, the selective scan and models."""
