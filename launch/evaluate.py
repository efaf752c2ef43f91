"""Captions a prepared split with a trained model and scores it (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D).

  python launch/evaluate.py --model_dir=runs/demo                       # test split, beam 3
  python launch/evaluate.py --model_dir=runs/demo --split=val --max_images=500 --beam_width=5
  python launch/evaluate.py --model_dir=gs://bucket/run --strategy=mirrored --num_cpu_devices=2
  python launch/evaluate.py --model_dir=runs/a,runs/b --remove_bad_endings --block_trigrams   # an ensemble
  TF_CONFIG=... python launch/evaluate.py --model_dir=runs/demo --strategy=multi_worker   # on every worker

Writes metrics.json, captions.json (COCO results format) and report.html (the
scores, then the best and worst images by CIDEr-D) into --output_dir, default
<model_dir>/eval_<split>. Needs `java` on PATH (PTB tokenizer, METEOR).
"""

import _bootstrap  # noqa: F401
from absl import app, flags

import cli

_SPLIT = flags.DEFINE_string("split", "test", "Split of the prepared records to caption.")
_MAX_IMAGES = flags.DEFINE_integer("max_images", None, "Caption only the first N images of the split.")
_RECORDS_DIR = flags.DEFINE_string("records_dir", None, "Prepared records, or a features cache made from them for "
                                   "the run's frozen encoder. Default: the run's data.features_dir when that "
                                   "cache exists, the run did not fine-tune its encoder and every member of an "
                                   "ensemble reads that cache; else data.records_dir.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write the results. Default: <model_dir>/eval_<split> "
                                  "(eval_<split>_ensemble for several checkpoints, in the first model_dir).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global decode batch (multiple of the replicas). "
                              "Default: up to 32 per replica.")
_METEOR = flags.DEFINE_bool("meteor", True, "Compute METEOR (~10 s to start its Java process).")
_REPORT = flags.DEFINE_integer("report_images", 10, "Best and worst images shown in report.html.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
cli.define_model_flags()
cli.define_strategy_flags()
cli.define_decode_flags()


def main(argv):
    del argv
    with cli.user_errors():
        strategy = cli.strategy_from_flags()
        from showtell_dist.evaluation import caption_soundness
        from showtell_dist.evaluation.evaluator import ReportOptions, SplitOptions, evaluate_split
        from showtell_dist.evaluation.metrics import check_java, format_metrics_table
        from showtell_dist.run.run_dir import RunDir
        from showtell_dist.training.phases import check_cache_serves_run, decode_data_dir

        check_java()
        members = cli.load_models(strategy)
        first = members[0]
        records_dir = _RECORDS_DIR.value or decode_data_dir([m.config for m in members])
        from showtell_dist.data.dataset_dir import load_manifest

        for member in members:  # a features cache cannot serve a run that fine-tuned its encoder
            check_cache_serves_run(member.config, records_dir, load_manifest(records_dir))
        run = RunDir(flags.FLAGS.model_dir[0])
        output_dir = _OUTPUT_DIR.value or run.eval_output(_SPLIT.value, ensemble=len(members) > 1)
        options = cli.decode_options(first.config)
        checkpoints = "; ".join(f"{m.checkpoint_path} (step {m.step})" for m in members)
        print(f"checkpoint{'s' if len(members) > 1 else ''} {checkpoints}; {_SPLIT.value} split of {records_dir}; "
              f"beam width {options.beam_width}, length normalization {options.length_normalization}; "
              f"{type(strategy).__name__} with {strategy.num_replicas_in_sync} replica(s)", flush=True)
        summary = evaluate_split(members, records_dir, _SPLIT.value, strategy, output_dir, options,
                                 SplitOptions(_MAX_IMAGES.value, _BATCH.value, _PROGRESS.value),
                                 ReportOptions(_METEOR.value, _REPORT.value,
                                               selection=run.read_selection()))  # val curves in report.html
        if not summary:  # a worker of a multi-worker job: it decoded its share, the chief reports
            return
        speed = summary["images_per_s"]
        print(f"{summary['num_images']} images" + (f", {speed:.1f} images/s" if speed else ""))
        print(format_metrics_table(summary["metrics"]))
        print(caption_soundness.describe(summary["caption_soundness"]))
        for path in summary["files"].values():
            print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
