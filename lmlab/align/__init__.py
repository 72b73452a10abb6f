"""Alignment: reward models, DPO and its family, PPO, GRPO, online preference optimization, Constitutional AI."""
