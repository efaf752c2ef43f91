"""Prepares a caption dataset: vocabulary JSON, sharded TFRecords, manifest.

  python launch/prepare_data.py --input_dir=../shared/data/flickr8k --output_dir=/tmp/f8k_records
  python launch/prepare_data.py --input_dir=data/coco --layout=coco --output_dir=gs://bucket/coco

Layouts: tutorial (images/, captions.csv, {split}_split_filenames.txt), flickr
(Flickr8k.token.txt + Flickr_8k.*Images.txt), coco (captions_*.json),
karpathy (dataset_*.json); auto detects which. A hand-made captions.csv row with
unquoted commas is read as image + the rest as caption, and counted.
"""

import _bootstrap  # noqa: F401
from absl import app, flags

import cli
from showtell_dist.config_fields import LAYOUT_CHOICES

_INPUT = flags.DEFINE_string("input_dir", None, "Dataset directory in a supported layout.", required=True)
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where to write records (local or gs://).", required=True)
_LAYOUT = flags.DEFINE_enum("layout", "auto", list(LAYOUT_CHOICES), "Input layout.")
_IMAGE_DIR = flags.DEFINE_string("image_dir", None, "Images directory, if not where the layout expects it.")
_LANG = flags.DEFINE_string("lang", "en", "spaCy language of spacy.blank(lang).")
_SPACY_MODEL = flags.DEFINE_string("spacy_model", None, "An installed spaCy pipeline to tokenize with instead.")
_MIN_COUNT = flags.DEFINE_integer("min_count", 1, "Words seen fewer times in train captions become <unk>.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", None, "Cap on vocabulary size including special tokens.")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "Cap on caption length in tokens (with <start> and <end>). "
                                "Default: the length covering 99.9% of train captions; longer ones are cut "
                                "and counted in the manifest.")
_PER_SHARD = flags.DEFINE_integer("images_per_shard", 1000, "Images per TFRecord shard.")
_WORKERS = flags.DEFINE_integer("num_workers", 8, "Shards written in parallel.")
_RESIZE_TO = flags.DEFINE_integer(
    "resize_to", 0, "Store images resized to NxN exactly as training resizes them (set it to the model's "
    "image_size): training decodes small JPEGs and skips the resize (benchmarks/input_pipeline.py). "
    "0 keeps the original size.")


def main(argv):
    del argv
    with cli.user_errors():
        from showtell_dist.data.prepare import PrepareOptions, prepare_dataset, summarize

        options = PrepareOptions(layout=_LAYOUT.value, image_dir=_IMAGE_DIR.value, lang=_LANG.value,
                                 spacy_model=_SPACY_MODEL.value, min_count=_MIN_COUNT.value,
                                 vocab_size=_VOCAB_SIZE.value, max_len=_MAX_LEN.value,
                                 images_per_shard=_PER_SHARD.value, num_workers=_WORKERS.value,
                                 resize_to=_RESIZE_TO.value)
        manifest = prepare_dataset(_INPUT.value, _OUTPUT.value, options)
        print(summarize(manifest))
        print(f"wrote {_OUTPUT.value}/manifest.json")


if __name__ == "__main__":
    app.run(main)
