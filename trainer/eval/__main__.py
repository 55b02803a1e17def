"""`python -m trainer.eval` (and `torchrun -m trainer.eval --no-ray`): the CLI in trainer/eval/cli.py."""

import sys

from raylm.cli import run_cli
from trainer.eval.cli import main

sys.exit(run_cli(main))
