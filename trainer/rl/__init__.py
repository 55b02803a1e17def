"""Reinforcement learning from verifiable rewards (GRPO) on Ray: `python -m trainer.rl`."""
