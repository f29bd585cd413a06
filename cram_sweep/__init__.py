"""cram-sweep: capacity sweeps of trainable input vectors for frozen language models."""
