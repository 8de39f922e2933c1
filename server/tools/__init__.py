"""Everything off the serving path: the synthetic checkpoint writer (synth), the demo model's
corpus, tokenizer, trainer and evaluation (demo), the benchmarks (bench) and the one PNG writer
their plots share (png.py).

The serving packages (server/model, server/engine, server/api, expert_cache, and server/cli apart
from the wiring of the `synth`, `bench` and `demo` commands) never import this package;
tests/test_tools_boundary.py holds them to it.
"""
