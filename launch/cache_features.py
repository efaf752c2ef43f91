"""Caches a frozen encoder's features of prepared records, so training and evaluation skip the CNN.

  python launch/cache_features.py --config=configs/flickr8k_mobilenet.py     # into config.data.features_dir
  python launch/cache_features.py --config=configs/flickr8k_mobilenet.py --output_dir=/tmp/f8k_features \
      --strategy=mirrored --batch_size=128

Reads config.data.records_dir (prepared with launch/prepare_data.py; prepared
here first if absent, as launch/train.py does), runs config.model's encoder
(built from model.encoder_weights, in inference mode) once per image and
writes the same shards with float16 features instead of images, vocab.json and
manifest.json (last). Train from it with --config.data.features_dir=<output_dir>.
"""

import _bootstrap  # noqa: F401  (puts the repo on sys.path)
from absl import flags

import cli

_CONFIG = cli.define_config_flag(None, "Experiment config file, e.g. configs/flickr8k_mobilenet.py.")
flags.mark_flag_as_required("config")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where to write the cache (local or gs://). "
                              "Default: the config's data.features_dir.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per encoder call (a multiple of the replicas).")
_SPLITS = flags.DEFINE_list("splits", None, "Splits to cache (default: all of the records).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
cli.define_strategy_flags()


def main(argv):
    del argv
    config = _CONFIG.value
    with cli.user_errors():
        cli.validate_config(config)  # every bad value in one message, before any work
        from showtell_dist.data import feature_cache
        from showtell_dist.data.prepare import ensure_prepared
        from showtell_dist.errors import ConfigError
        from showtell_dist.features import builder

        output_dir = _OUTPUT.value or feature_cache.features_dir_of(config)
        if not output_dir:
            raise ConfigError("no --output_dir and the config has no data.features_dir; pass --output_dir=DIR.")
        strategy = cli.strategy_from_flags()
        ensure_prepared(config)
        manifest = builder.cache_features(config.data.records_dir, output_dir, config.model,
                                          strategy=strategy, batch_size=_BATCH.value, splits=_SPLITS.value,
                                          progress=_PROGRESS.value)
        print(builder.summarize(manifest))
        print(f"wrote {output_dir.rstrip('/')}/manifest.json")


if __name__ == "__main__":
    cli.run(main)
