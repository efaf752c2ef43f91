"""Training input pipeline throughput per CPU core: original-size JPEG records vs pre-resized records.

    python benchmarks/input_pipeline.py                 # 300 images, 224x224 model input
    python benchmarks/input_pipeline.py --images=500 --batches=40

The shared Flickr8k copy holds 224x224 images, so the "original" records are
made by upscaling the first --images training images to 500x375 (the typical
Flickr8k/COCO size) and saving them as JPEG quality 90 in a temp dir. Both
record sets are written by `prepare_dataset` from that same directory: once as
they are, once with `resize_to=224` (`prepare_data.py --resize_to=224`), which
stores each image resized exactly as training resizes it.

Each is then read by `pipeline.train_input_fn` as training reads it (shard
groups, parse, JPEG decode, resize when needed, captions, batch; uint8
images; non-deterministic parallel decoding, caption buckets) for --batches
batches after two warm-up batches. Throughput per core is images divided by
the CPU seconds the process spent (user + system, every thread), so the load
of other processes on a shared machine does not change it; wall-clock
images/s are printed beside it. The two timed runs alternate --rounds times.

Then, on paper: the host cores needed to feed one accelerator, from the
measured images per core-second and a cited training throughput:
NVIDIA's ResNet-50 v1.5 TensorFlow training benchmark, 1x A100 40GB, mixed
precision + XLA, batch 256: 2375 images/s (NVIDIA DeepLearningExamples,
TensorFlow/Classification/ConvNets/resnet50v1.5/README.md, "Training
performance: NVIDIA DGX A100 (8x A100 40GB)"). A Show-and-Tell step with a
trainable encoder of ResNet-50's cost runs at about that rate; a frozen
encoder's features cache needs no image decoding at all.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from showtell_dist.data import pipeline  # noqa: E402
from showtell_dist.data.prepare import PrepareOptions, prepare_dataset  # noqa: E402

FLICKR8K = os.path.join(REPO_ROOT, "..", "shared", "data", "flickr8k")
CITED_IMAGES_PER_S = 2375  # 1x A100 40GB, ResNet-50 v1.5 training, mixed precision + XLA (see the docstring)
ORIGINAL_SIZE = (500, 375)  # width, height


def make_originals(out_dir: str, num_images: int) -> str:
    """A tutorial-layout dataset of num_images Flickr8k images upscaled to 500x375, with their captions."""
    names = open(os.path.join(FLICKR8K, "train_split_filenames.txt")).read().split()[:num_images]
    wanted = set(names)
    os.makedirs(os.path.join(out_dir, "images"))
    for name in names:
        with Image.open(os.path.join(FLICKR8K, "images", name)) as image:
            image.convert("RGB").resize(ORIGINAL_SIZE, Image.BICUBIC).save(
                os.path.join(out_dir, "images", name), quality=90)
    with open(os.path.join(FLICKR8K, "captions.csv"), newline="") as f:
        rows = [r for r in csv.reader(f)][1:]
    with open(os.path.join(out_dir, "captions.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption")] + [r for r in rows if r[0] in wanted])
    with open(os.path.join(out_dir, "train_split_filenames.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    return out_dir


def records_bytes(records_dir: str, manifest: dict) -> int:
    return sum(s["bytes"] for s in manifest["splits"]["train"]["shards"])


def time_pipeline(manifest: dict, records_dir: str, image_size: int, batch: int, batches: int) -> tuple[float, float]:
    """(images per CPU-second, images per wall-second) of the training pipeline over `batches` batches."""
    spec = pipeline.PipelineSpec(
        data_dir=records_dir, split="train", image_size=image_size, captions_per_image=5,
        max_len=manifest["max_len"], global_batch_size=batch, seed=0, shuffle_buffer=200,
        caption_buckets=pipeline.caption_buckets(manifest["max_len"], 4), deterministic=False)
    iterator = iter(pipeline.train_input_fn(manifest, spec)(tf.distribute.InputContext()))
    for _ in range(2):  # warm-up: builds the pipeline's functions, fills its buffers
        next(iterator)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(batches):
        b = next(iterator)
    b["images"].numpy()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return batches * batch / cpu, batches * batch / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="Flickr8k training images to upscale")
    parser.add_argument("--image_size", type=int, default=224, help="the model's input size")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating timed runs of each record kind")
    args = parser.parse_args()
    if not os.path.isdir(FLICKR8K):
        sys.exit(f"{FLICKR8K} is not present: this benchmark reads the shared Flickr8k images.")

    with tempfile.TemporaryDirectory() as tmp:
        raw = make_originals(os.path.join(tmp, "raw"), args.images)
        kinds = {}
        for name, resize_to in (("original 500x375", 0), (f"pre-resized {args.image_size}", args.image_size)):
            out = os.path.join(tmp, name.split()[0])
            manifest = prepare_dataset(raw, out, PrepareOptions(images_per_shard=100, resize_to=resize_to))
            kinds[name] = (out, manifest)
        results = {name: [] for name in kinds}
        for _ in range(args.rounds):
            for name, (out, manifest) in kinds.items():
                results[name].append(time_pipeline(manifest, out, args.image_size, args.batch, args.batches))

    cores = pipeline.host_cores()
    print(f"training input pipeline, {args.batches} batches of {args.batch} images -> {args.image_size}x"
          f"{args.image_size} uint8, 5 captions each; host cores: {cores}; best of {args.rounds} runs")
    print(f"{'records':<22}{'KB/image':>10}{'images/s/core':>15}{'images/s (wall)':>17}"
          f"{'cores for 2375 img/s':>22}")
    per_core = {}
    for name, (out, manifest) in kinds.items():
        cpu_rate = max(r[0] for r in results[name])
        wall_rate = max(r[1] for r in results[name])
        per_core[name] = cpu_rate
        kb = records_bytes(out, manifest) / manifest["splits"]["train"]["images"] / 1024
        print(f"{name:<22}{kb:>10.1f}{cpu_rate:>15.0f}{wall_rate:>17.0f}{CITED_IMAGES_PER_S / cpu_rate:>22.1f}")
    original, resized = per_core.values()
    print(f"pre-resized / original, images per core-second: {resized / original:.2f}x")
    print(f"cited accelerator throughput: {CITED_IMAGES_PER_S} images/s = ResNet-50 v1.5 training on 1x A100 40GB, "
          "mixed precision + XLA (NVIDIA DeepLearningExamples, TensorFlow/Classification/ConvNets/resnet50v1.5/"
          "README.md)")


if __name__ == "__main__":
    main()
