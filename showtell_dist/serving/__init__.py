"""Serving an exported captioner over HTTP: micro-batched POST /caption, GET /health and a web page.

Imports TensorFlow and aiohttp, never the toolkit's model or training code:
everything the server needs is in the SavedModel written by launch/export.py.
"""

from showtell_dist.serving.app import ServerSettings, make_app
from showtell_dist.serving.saved_model_captioner import ImageCaptions, ImageDecodeError, SavedModelCaptioner
from showtell_dist.serving.server import BackgroundServer, serve_forever

__all__ = ["BackgroundServer", "ImageCaptions", "ImageDecodeError", "SavedModelCaptioner", "ServerSettings",
           "make_app", "serve_forever"]
