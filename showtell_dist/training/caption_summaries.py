"""Validation images and their current captions in TensorBoard, at every evaluation of a training run.

With `train.summary_images` = N > 0 (0 turns it off) the chief writes, into
model_dir/eval at every validation step, for each of the first N images of the
val split in record order (the same images in every invocation of a run, so
the captions of one image can be followed across a resume):

  image  val_images/<k>_<image id>     the picture
  text   val_captions/<k>_<image id>   its greedy and beam captions, then its references
  text   val_captions/all              one table of every sample's captions

(<k> = 00, 01, ... orders them as in the records; images and text have
different tags because TensorBoard keeps one kind of data per tag.)

The beam captions use the run's decoding options (its eval section, every
one of them, through decoding/decoder.py as evaluation does), so they are what
the final evaluation will write; the greedy ones are plain greedy decoding. Over a features cache the model decodes from the
cached features and the pictures come from the image records the cache was
made from (its manifest's features.source_records, else data.records_dir);
when neither holds them, only the text is written, and the log says so.
"""

from __future__ import annotations

import re

import tensorflow as tf

from showtell_dist.data import dataset_dir, pipeline
from showtell_dist.decoding.decoder import build_decoder
from showtell_dist.decoding.options import GREEDY
from showtell_dist.distribute.strategy import is_chief
from showtell_dist.errors import ConfigError, DataError
from showtell_dist.run.run_dir import eval_options

IMAGE_TAG = "val_images"
TEXT_TAG = "val_captions"
MAX_PICTURE_SIDE = 256  # pictures larger than this are shrunk for the event file


def summary_images_of(config) -> int:
    """config.train.summary_images (0 when the config predates it), checked."""
    n = config.train.get("summary_images", 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"train.summary_images must be an integer >= 0 (0 turns the TensorBoard caption "
                          f"samples off), got {n!r}.")
    return n


def _first_examples(data_dir: str, manifest: dict, n: int) -> list[dict]:
    """The first n val examples of data_dir in record order, as numpy (without their caption ids)."""
    return [{k: v.numpy() for k, v in e.items() if k != "captions"}
            for e in dataset_dir.first_examples(data_dir, manifest, "val", n)]


def _decoder_inputs(examples: list[dict], manifest: dict, image_size: int) -> tf.Tensor:
    """[n, dim] cached features, or [n, size, size, 3] decoded images."""
    if pipeline.feature_dim(manifest) is not None:
        return tf.stack([e["features"] for e in examples])
    return tf.stack([pipeline.decode_image(e["jpeg"], image_size) for e in examples])


def _image_records_of(config, manifest: dict) -> list[str]:
    """Where the pictures of a features cache may be: the records it was made from, then data.records_dir."""
    candidates = [manifest["features"].get("source_records") or "", config.data.get("records_dir", "") or ""]
    return [c for i, c in enumerate(candidates) if c and c not in candidates[:i]]


def _picture(jpeg: bytes) -> tf.Tensor:
    """JPEG bytes -> [1, h, w, 3] uint8, shrunk to fit MAX_PICTURE_SIDE."""
    image = tf.io.decode_jpeg(jpeg, channels=3)
    h, w = int(image.shape[0]), int(image.shape[1])
    if max(h, w) > MAX_PICTURE_SIDE:
        scale = MAX_PICTURE_SIDE / max(h, w)
        size = [max(1, round(h * scale)), max(1, round(w * scale))]
        image = tf.cast(tf.clip_by_value(tf.image.resize(image, size, antialias=True), 0, 255), tf.uint8)
    return image[tf.newaxis]


def _markdown_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*").replace("_", "\\_") or "&nbsp;"


def _tag_suffix(index: int, image_id: str) -> str:
    return f"{index:02d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', image_id)}"


class CaptionSummaries:
    """Writes the sample images with their current captions at each validation; see the module docstring."""

    def __init__(self, exp, strategy: tf.distribute.Strategy, *, log=print):
        self.exp = exp
        self.samples: list[dict] = []
        n = summary_images_of(exp.config)
        if not n or not is_chief(strategy):
            return
        if "val" not in exp.manifest["splits"]:
            log(f"train.summary_images={n}: the prepared dataset has no val split, so no caption samples are "
                "written to TensorBoard.")
            return
        self.options = eval_options(exp.config)  # validated: before step 1, not at the first validation
        data_dir = exp.data_dir  # the current phase's: images from a finetune phase on
        examples = _first_examples(data_dir, exp.manifest, n)
        self.from_features = pipeline.feature_dim(exp.manifest) is not None
        ids = [e["image_id"].decode("utf-8") for e in examples]
        self.inputs = _decoder_inputs(examples, exp.manifest, exp.model.image_size)
        self._inputs = {data_dir: self.inputs}  # data dir -> its decoder inputs: a later phase may read another
        if self.from_features:
            sources = _image_records_of(exp.config, exp.manifest)
            source = next((s for s in sources if dataset_dir.is_prepared(s)), None)
            found = dataset_dir.read_examples(source, "val", ids, with_jpeg=True) if source else {}
            jpegs = {i: e["jpeg"] for i, e in found.items() if "jpeg" in e}
            missing = [i for i in ids if i not in jpegs]
            if missing:
                log(f"caption samples: {len(missing)} of the {len(ids)} val pictures are not in the image records "
                    f"of features cache {data_dir} ({' or '.join(sources) or 'none recorded'}); their captions "
                    "are written without the picture.")
        else:
            jpegs = {i: e["jpeg"] for i, e in zip(ids, examples)}
        self.samples = [{"image_id": i, "tag": _tag_suffix(k, i), "jpeg": jpegs.get(i),
                         "references": [r.decode("utf-8") for r in e["caption_text"]]}
                        for k, (i, e) in enumerate(zip(ids, examples))]
        self._decode = self._build_decoder()

    @property
    def image_ids(self) -> list[str]:
        return [s["image_id"] for s in self.samples]

    def _inputs_of(self, data_dir: str | None, manifest: dict | None) -> tf.Tensor:
        """The samples' decoder inputs from `data_dir` (a phase's data: its images or cached features; default
        the experiment's when this was built), read once per directory."""
        data_dir = data_dir or self.exp.data_dir
        if data_dir not in self._inputs:
            examples = _first_examples(data_dir, manifest, len(self.samples))
            if [e["image_id"].decode("utf-8") for e in examples] != self.image_ids:
                raise DataError(f"the first val images of {data_dir} are not those of the run's other data "
                                f"({', '.join(self.image_ids)}): prepare or cache it from the same records.")
            self._inputs[data_dir] = _decoder_inputs(examples, manifest, self.exp.model.image_size)
        return self._inputs[data_dir]

    def _build_decoder(self):
        model, tokenizer = self.exp.model, self.exp.tokenizer
        greedy = build_decoder([model], GREEDY, tokenizer, from_features=True)
        beam = build_decoder([model], self.options, tokenizer, from_features=True)

        @tf.function
        def decode(inputs):  # [n, dim] cached features or [n, size, size, 3] images: one trace each
            features = inputs if inputs.shape.rank == 2 else model.encode(inputs, training=False)  # each image once
            return greedy(features).tokens[:, 0], beam(features).tokens[:, 0]  # [n, time] each; the best beam

        return decode

    def captions(self, data_dir: str | None = None, manifest: dict | None = None) -> list[dict]:
        """The samples' current captions: [{"image_id", "greedy", "beam", "references"}], decoded from
        data_dir (the current phase's data, with its manifest; default the data this was built with)."""
        if not self.samples:
            return []
        inputs = self._inputs_of(data_dir, manifest)
        with self.exp.trainer.evaluation_weights():  # the weights the evaluations score
            greedy, beam = self._decode(inputs)
        decode = self.exp.tokenizer.decode
        return [{"image_id": s["image_id"], "greedy": decode(g), "beam": decode(b), "references": s["references"]}
                for s, g, b in zip(self.samples, greedy.numpy(), beam.numpy())]

    def __call__(self, writer, step: int, data_dir: str | None = None, manifest: dict | None = None) -> list[dict]:
        """Decodes the samples with the current weights (from data_dir: see `captions`) and writes their
        summaries at `step`."""
        captions = self.captions(data_dir, manifest)
        if not captions:
            return captions
        beam = f"beam {self.options.beam_width}"
        rows = []
        with writer.as_default(step=step):
            for sample, c in zip(self.samples, captions):
                if sample["jpeg"] is not None:
                    tf.summary.image(f"{IMAGE_TAG}/{sample['tag']}", _picture(sample["jpeg"]),
                                     description=sample["image_id"])
                refs = "\n".join(f"- {_markdown_cell(r)}" for r in c["references"])
                text = (f"**greedy:** {_markdown_cell(c['greedy'])}  \n**{beam}:** {_markdown_cell(c['beam'])}"
                        f"\n\nreferences:\n\n{refs}")
                tf.summary.text(f"{TEXT_TAG}/{sample['tag']}", text)
                cells = (c["image_id"], c["greedy"], c["beam"], c["references"][0] if c["references"] else "")
                rows.append("| " + " | ".join(_markdown_cell(x) for x in cells) + " |")
            table = "\n".join([f"| image | greedy | {beam} | first reference |", "|---|---|---|---|", *rows])
            tf.summary.text(f"{TEXT_TAG}/all", table)
        return captions
