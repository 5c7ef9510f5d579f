"""What dropout's mask costs (docs/LANGUAGE.md, "Variational dropout"):

    python benchmarks/dropout_mask.py [--repeats 30]

Prints the median time of making the mask of a [256, 512] float32 value from its per-sample seeds
(`ops.dropout_mask`, the hash), of a `dropout` call that reuses the solve's mask (`ops.dropout`, the mask kept on
the seeds), and of a 512 x 512 `linear` on the same value for scale; one thread.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import median_time  # noqa: E402

from fpidsl.runtime import ops  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 512, generator=gen)
    seeds = torch.randint(0, 2**31 - 1, (256,), generator=gen)
    weight = torch.randn(512, 512, generator=gen)
    rows = [("make the mask (dropout_mask)", lambda: ops.dropout_mask(x, seeds, p=0.1, key=0)),
            ("dropout, the solve's mask reused", lambda: ops.dropout(x, seeds, p=0.1, key=0)),
            ("linear 512 x 512, for scale", lambda: torch.nn.functional.linear(x, weight))]
    for name, fn in rows:
        print(f"{name:36s} {1e3 * median_time(fn, args.repeats, inner=5):8.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
