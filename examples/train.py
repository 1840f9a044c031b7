"""A toy training script that logs metrics with exp; no third-party packages.

Run it under exp (see run_exp.py and config.toml) or directly: when not
launched by exp it logs into a fresh experiment under ./results.
"""
import argparse
import math
import os
import random
import sys
import time

try:
    import exp
except ImportError:  # running from a checkout of exp: use the exp.py one level up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import exp


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--sleep", type=float, default=0.02, help="seconds per step")
    p.add_argument("--fail-first", action="store_true",
                   help="fail on the first attempt in an experiment directory (to show retries)")
    args = p.parse_args()

    e = exp.load_experiment(standalone=True)
    marker = os.path.join(e.work_dir, "attempted")
    if args.fail_first and not os.path.exists(marker):
        open(marker, "w").close()
        print("simulated crash on the first attempt", file=sys.stderr)
        return 1

    rng = random.Random(args.seed)
    loss = 2.0
    for step in range(1, args.steps + 1):
        loss *= 1.0 - args.lr * (0.5 + rng.random())
        e.upd_row(step=step, loss=loss, lr=args.lr)
        if step > args.steps // 2:  # a column that appears midway, e.g. validation
            e.upd_row(val_acc=1.0 - math.exp(-step / args.steps * 3))
        e.save_row()
        print(f"\rstep {step}/{args.steps} loss {loss:.4f}", end="", flush=True)
        time.sleep(args.sleep)
    print(f"\ndone: {e.current_run_id} in {e.work_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
