"""Accuracy per step of DBP settings against BP (one seed), for choosing defaults and for docs/TUNING.md.

Each setting trains the benchmark CNN on a Fashion-MNIST subset with the same data order, Adam one-cycle and
budget; test accuracy is recorded every ``--eval-every`` steps. Accuracy at a given step does not depend on the
machine's load, so this sweep can run beside other work; the wall-clock columns can not (use
time_to_accuracy.py and overhead.py for time).

    python examples/benchmarks/sweep.py --settings '{}' '{"max_rows": 64}' '{"max_rows": 64, "decor_lr": 3e-3}'
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from time_to_accuracy import run

from common import machine, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--settings",
        nargs="+",
        type=json.loads,
        default=[{}, {"max_rows": 64}],
        help="DecorrelationCallback kwargs as JSON, one per DBP run (BP runs first)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train-limit", type=int, default=20000)
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", default="examples/benchmarks/results/sweep.json")
    args = parser.parse_args()
    args.progress = False
    rows: list[dict[str, Any]] = []
    for method, kwargs in [("BP", {}), *[("DBP", s) for s in args.settings]]:
        r = run(method, args.seed, args.epochs, args.lr, args, kwargs, eval_every=args.eval_every)
        rows.append({"method": method, "settings": kwargs, **r})
    steps = [h[1] for h in rows[0]["history"]]
    print("\nTest accuracy (%) at step:")
    print(f"{'method':<5} {'settings':<48}" + "".join(f"{s:>7}" for s in steps))
    for r in rows:
        accs = {h[1]: h[2] for h in r["history"]}
        print(
            f"{r['method']:<5} {json.dumps(r['settings']):<48}"
            + "".join(f"{100 * accs.get(s, float('nan')):7.1f}" for s in steps)
        )
    print(f"\nJSON: {write_json(args.out, {'machine': machine(), 'args': vars(args), 'runs': rows})}")


if __name__ == "__main__":
    main()
