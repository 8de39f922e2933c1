"""Synthetic checkpoints are a pure function of the seed, and are written streaming."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from expert_cache.safetensors_index import SafetensorsIndex
from server.tools.synth import weights as synth_weights
from server.tools.synth import write_checkpoint
from server.tools.synth.spec import make_spec
from server.tools.synth.vocab import build_vocab, token_domains
from server.tools.synth.weights import PlantedWeights

REPO = Path(__file__).resolve().parents[3]


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    a = _files(write_checkpoint(tmp_path / "a", "tiny", seed=5, shard_bytes=300_000))
    b = _files(write_checkpoint(tmp_path / "b", "tiny", seed=5, shard_bytes=300_000))
    assert a == b and len(a) > 6
    c = write_checkpoint(tmp_path / "c", "tiny", seed=6, shard_bytes=300_000)
    assert (c / "tokenizer.json").read_bytes() == a["tokenizer.json"]
    ia, ic = SafetensorsIndex.from_directory(tmp_path / "a"), SafetensorsIndex.from_directory(c)
    for name in ("model.embed_tokens.weight", "model.layers.3.mlp.experts.7.down_proj.weight"):
        assert ia.read(name).shape == ic.read(name).shape
        assert not torch.equal(ia.read(name), ic.read(name))


def test_streamed_shards_match_a_materialised_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(synth_weights, "BLOCK_ELEMS", 5000)  # embed / lm_head in many blocks
    overrides = {"num_hidden_layers": 2, "vocab_size": 3000}
    out = write_checkpoint(tmp_path / "s", "small", seed=1, dtype="bf16", shard_bytes=1 << 20,
                           overrides=overrides)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 4
    # Reference: every tensor built whole in memory, saved by the safetensors library.
    spec = make_spec("small", seed=1, dtype="bf16", overrides=overrides)
    vocab = build_vocab(3000)
    w = PlantedWeights(spec, token_domains(vocab, 8), token_domains(vocab, 8, spaced_only=True))
    reference = {t.name: w.tensor(t).to(torch.bfloat16) for t in spec.tensors()}
    save_file(reference, str(tmp_path / "ref.safetensors"))
    expected = load_file(str(tmp_path / "ref.safetensors"))
    streamed: dict[str, torch.Tensor] = {}
    for shard in shards:
        streamed.update(load_file(str(shard)))
    index = SafetensorsIndex.from_directory(out)  # the offsets the expert cache will read
    assert set(streamed) == set(expected) == set(index)
    for name, tensor in expected.items():
        assert streamed[name].dtype == index.info(name).dtype == torch.bfloat16
        assert torch.equal(streamed[name].view(torch.int16), tensor.view(torch.int16)), name
        assert torch.equal(index.read(name).view(torch.int16), tensor.view(torch.int16)), name


def test_blocks_are_at_most_one_tensor_and_split_the_vocabulary() -> None:
    spec = make_spec("small", overrides={"num_hidden_layers": 1, "vocab_size": 20000})
    vocab = build_vocab(20000)
    w = PlantedWeights(spec, token_domains(vocab, 8), token_domains(vocab, 8, spaced_only=True))
    for t in spec.tensors()[:12] + spec.tensors()[-1:]:
        sizes = [b.numel() for b in w.blocks(t)]
        assert sum(sizes) == math.prod(t.shape) and max(sizes) <= max(math.prod(t.shape[1:]),
                                                                    synth_weights.BLOCK_ELEMS)
        if t.kind in ("embed", "lm_head"):
            assert len(sizes) > 10


_MEASURE = """
import json, math, resource, sys
from pathlib import Path
from server.tools.synth.spec import make_spec
from server.tools.synth.writer import write_spec
out = Path(sys.argv[1])
write_spec(out / "warm", make_spec("tiny"), shard_bytes=1 << 20)  # one-time allocations
spec = make_spec("small", dtype="fp32", overrides={"num_hidden_layers": 4, "intermediate_size": 256})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
write_spec(out / "big", spec, shard_bytes=64 << 20)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"growth": after - before,
                  "largest": max(4 * math.prod(t.shape) for t in spec.tensors())}))
"""


def test_peak_memory_is_about_one_tensor(tmp_path: Path) -> None:
    """A fresh process writes a ~214 MB checkpoint; its peak RSS may grow by a few tensors only."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    total = sum(p.stat().st_size for p in (tmp_path / "big").glob("*.safetensors"))
    assert total > 200 * 2**20 and m["largest"] == 4 * 4096 * 256
    assert m["growth"] < 6 * m["largest"], m  # 24 MB, against 214 MB written
