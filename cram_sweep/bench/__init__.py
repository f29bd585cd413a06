"""`cram-sweep bench`: run.py runs it; measure.py measures; paper.py is the paper's one-sample loop."""
