"""Runs `train_tiny` under Mirrored over N logical CPUs in a fresh process; saves results as npz.

usage: tiny_train_subprocess.py REPLICAS OUT.npz [key=value train overrides...]
"""

import os
import sys

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]

import numpy as np  # noqa: E402

from showtell_dist.distribute.strategy import create_strategy  # noqa: E402


def main():
    replicas, out = int(sys.argv[1]), sys.argv[2]
    overrides = {k: v if k == "dtype_policy" else float(v) for k, v in (a.split("=", 1) for a in sys.argv[3:])}
    strategy = create_strategy("mirrored", num_cpu_devices=replicas)
    from tiny_setup import train_tiny

    metrics, weights = train_tiny(strategy, **overrides)
    np.savez(out, loss=metrics["loss"], tokens=metrics["tokens"], grad_norm=metrics["grad_norm"],
             **{f"w{i}": w for i, w in enumerate(weights)})


if __name__ == "__main__":
    main()
