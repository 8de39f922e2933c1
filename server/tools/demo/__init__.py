"""How the built-in demo EMO (server/demo_model) is made: a corpus of seven domains, a byte-level
BPE tokenizer, EMO training with document pools, and the held-out evaluation."""
