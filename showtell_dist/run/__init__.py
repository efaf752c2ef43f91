"""What a training run leaves on disk and how to use it: run_dir.py (`RunDir`: every path of a run, the
config and vocabulary check on reuse, checkpoint resolution, selection.json; decoding options) and
restore.py (the trained model of a run)."""
