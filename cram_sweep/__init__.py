"""cram-sweep: capacity sweeps of trainable input vectors for frozen language models.

In a notebook: `load_results(SWEEP_DIR)` gives every finished sample as a pandas DataFrame and
`load_capacity(SWEEP_DIR)` the capacity table (report/capacity.csv).

Both are imported on first use: the engine, the workers and `status` import this package too, and must not
pay for pandas and matplotlib (about 2 s and 400 MB per process).
"""

__all__ = ["load_results", "load_capacity"]


def __getattr__(name: str):
    if name in __all__:
        from .report import build

        return getattr(build, name)
    raise AttributeError(f"module 'cram_sweep' has no attribute {name!r}")
