"""Evaluation: what a run or a checkpoint is scored on, in the training loop and in `python -m trainer.eval`.

suite.py: the [eval] config and the set of held-out datasets and tasks it names, checked before any compute;
heldout.py: loss, perplexity and bits per byte on val rows; multiple_choice.py: task accuracy; job.py: the
`python -m trainer.eval` job on every rank; __main__.py: its CLI; harness.py: the lm-evaluation-harness adapter.
"""
