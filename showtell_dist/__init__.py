"""showtell_dist: distributed Show-and-Tell image captioning on tf.distribute."""

__version__ = "0.1.0"
