"""Synthetic EMO-format checkpoints of any shape, with planted domain -> expert structure.

A prompt drawn from domain d (``sample_prompt``) routes, at every MoE layer, almost all of its
router probability to the experts planted for d (``planted_experts``); see weights.py for how.
"""

from server.tools.synth.vocab import DOMAINS, sample_prompt
from server.tools.synth.writer import demo_checkpoint_dir, planted_experts, write_checkpoint

__all__ = ["DOMAINS", "demo_checkpoint_dir", "planted_experts", "sample_prompt", "write_checkpoint"]
