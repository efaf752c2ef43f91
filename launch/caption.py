"""Captions image files with a trained model: one `path<TAB>caption` line per image.

  python launch/caption.py --model_dir=runs/demo photo.jpg 'shots/*.png'
  python launch/caption.py --model_dir=runs/demo --images='gs://bucket/imgs/*.jpg' --beam_width=5 --top_k=3
  python launch/caption.py --model_dir=runs/a,runs/b photo.jpg        # an ensemble of two runs

Any format Pillow reads. With --top_k=K > 1 each image gets K lines
`path<TAB>caption<TAB>score`, best first (score: the beam search's length-
normalised log-probability). A file that is missing or not an image gets an
error line on stderr and the others are still captioned; the exit status is
then 1 (0 when every image was captioned, 2 for a bad model_dir or flag).
"""

import sys

import _bootstrap  # noqa: F401
from absl import app, flags

import cli

_IMAGES = flags.DEFINE_list("images", [], "Image paths or glob patterns (also accepted as positional arguments).")
_TOP_K = flags.DEFINE_integer("top_k", 1, "Print the K best captions of each image with their scores.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Images captioned together.")
cli.define_model_flags()
cli.define_decode_flags()


def main(argv):
    paths = list(_IMAGES.value) + list(argv[1:])
    with cli.user_errors():
        from showtell_dist.errors import ConfigError

        if not paths:
            raise ConfigError("no images given: pass image paths or globs as arguments or with --images.")
        from showtell_dist.evaluation.captioner import caption_files

        members = cli.load_models()
        results, errors = caption_files(members, paths, cli.decode_options(members[0].config), _TOP_K.value,
                                        batch_size=_BATCH.value)
    for r in results:
        if _TOP_K.value == 1:
            print(f"{r['path']}\t{r['caption']}")
        else:
            for caption, score in r["top_k"]:
                print(f"{r['path']}\t{caption}\t{score:.4f}")
    sys.stdout.flush()
    for _, message in errors:
        print(f"error: {message}", file=sys.stderr)
    if errors:
        print(f"{len(errors)} of {len(results) + len(errors)} input(s) could not be captioned.", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
