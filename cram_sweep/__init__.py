"""cram-sweep: capacity sweeps of trainable input vectors for frozen language models.

In a notebook: `load_results(SWEEP_DIR)` gives every finished sample as a pandas DataFrame and
`load_capacity(SWEEP_DIR)` the capacity table (report/capacity.csv).
"""

from .report import load_capacity, load_results

__all__ = ["load_results", "load_capacity"]
