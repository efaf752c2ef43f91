"""Exports a trained model as a SavedModel that captions encoded images (JPEG/PNG bytes).

  python launch/export.py --model_dir=runs/f8k                     # -> runs/f8k/export
  python launch/export.py --model_dir=runs/f8k --checkpoint=runs/f8k/checkpoints/ckpt-500 \
      --export_dir=/tmp/captioner --beam_width=5
  python launch/export.py --model_dir=runs/f8k --checkpoint=runs/f8k/best,runs/f8k/checkpoints  # an ensemble

Load it with TensorFlow alone:
  m = tf.saved_model.load(export_dir)
  out = m.signatures["serving_default"](images=tf.constant([open("a.jpg", "rb").read()]))
  out["captions"], out["scores"]   # [n, beam_width], best first

A batch containing bytes that are not an image fails as a whole with TensorFlow's
InvalidArgumentError.
"""

import _bootstrap  # noqa: F401  (puts the repo on sys.path)
from absl import app, flags

import cli

_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "Where to write the SavedModel (default: model_dir/export).")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "Maximum generated tokens incl. <end> (default: the "
                                "vocabulary's max_len - 1).")
cli.define_model_flags()
cli.define_decode_flags("Captions per image (beam size).")


def main(argv):
    del argv
    export_dir = _EXPORT_DIR.value or f"{flags.FLAGS.model_dir[0].rstrip('/')}/export"
    with cli.user_errors():
        from showtell_dist.export import export_saved_model

        members = cli.load_models()
        options = cli.decode_options(members[0].config, max_new_tokens=_MAX_LEN.value)
        export_saved_model(members, export_dir, options)
    checkpoints = "; ".join(f"{m.checkpoint_path} (step {m.step})" for m in members)
    print(f"exported {checkpoints} to {export_dir}: signature "
          f"serving_default(images: string[n]) -> captions string[n, {options.beam_width}], "
          f"scores float32[n, {options.beam_width}]", flush=True)


if __name__ == "__main__":
    app.run(main)
