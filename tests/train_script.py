"""Run one training in a fresh process (used by the resume and DDP tests).

Usage: python tests/train_script.py [--resume] [--kill-at-save STEP] -- override ...
``--kill-at-save`` sends SIGKILL to this process right after the Trainer wrote checkpoint STEP
and before it is marked complete: a real crash in the middle of saving.
"""

import argparse
import json
import os
import signal
import sys

from transformers import TrainerCallback

from medgemma_lib.core.config import load_config
from medgemma_lib.training.train import run_training


class KillAtSave(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at-save", type=int)
    parser.add_argument("--result")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(None, args.overrides)
    callbacks = [KillAtSave(args.kill_at_save)] if args.kill_at_save else None
    result = run_training(cfg, callbacks=callbacks, resume=args.resume, verbose=True)
    if args.result and int(os.environ.get("RANK", "0")) == 0:
        with open(args.result, "w", encoding="utf-8") as handle:
            json.dump(result.to_dict(), handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
