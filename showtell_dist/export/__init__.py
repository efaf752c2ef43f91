"""SavedModel export: encoded images in, captions out, all in one TensorFlow graph."""

from showtell_dist.export.saved_model import (SIGNATURE_KEY, CaptionModule, build_caption_module,
                                              decode_and_resize, export_saved_model)

__all__ = ["SIGNATURE_KEY", "CaptionModule", "build_caption_module", "decode_and_resize", "export_saved_model"]
