"""`python -m trainer.harness`, as documented: the lm-evaluation-harness adapter lives in trainer/eval/harness.py."""

import sys

from raylm.cli import run_cli
from trainer.eval.harness import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
