"""One worker of a MultiWorkerMirrored job (TF_CONFIG) decoding a split; writes the captions it holds as JSON.

usage: decode_worker_subprocess.py MODEL_DIR RECORDS_DIR SPLIT OUT.json
"""

import json
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

from showtell_dist.distribute.strategy import create_strategy  # noqa: E402


def main():
    model_dir, records_dir, split, out = sys.argv[1:5]
    strategy = create_strategy("multi_worker")
    from showtell_dist.decoding.options import DecodeOptions
    from showtell_dist.evaluation.evaluator import decode_split
    from showtell_dist.run.restore import load_trained_model

    trained = load_trained_model(model_dir, strategy=strategy)
    results = decode_split([trained], records_dir, split, strategy, DecodeOptions(beam_width=2), batch_size=4,
                           progress=False)
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
