"""What a training run leaves on disk and how to use it: run_dir.py (layout, selected checkpoint, decoding
options) and restore.py (the trained model of a run)."""
