"""The training loop on CPU: loss falls under both recipes; the checkpoint loads in the serving core."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from server.demo_model import demo_model_dir
from server.model.config import load_config
from server.tools.demo.corpus import DOMAINS, Document
from server.tools.demo.evaluate import EvalConfig, evaluate_mode, prepare
from server.tools.demo.tokenizer_train import EOS, PAD, save_tokenizer, special_id, train_tokenizer
from server.tools.demo.train.config import DemoModelConfig
from server.tools.demo.train.data import batches, pack_rows, split_chunks, tokenize
from server.tools.demo.train.export import load_checkpoint, save_checkpoint
from server.tools.demo.train.loop import TrainConfig, train
from server.tools.demo.train.model import EmoForTraining
from server.tools.demo.train.plan import RoutePlan
from server.tools.demo.train.run import PRESETS
from tests.tools.demo.conftest import FIXTURE

TEXTS = {
    "python": (FIXTURE / "python/json_demo/ringbuf.py").read_text(),
    "c": (FIXTURE / "usr/include/demo/ring.h").read_text(),
    "licence": (FIXTURE / "usr/share/common-licenses/Demo-1.0").read_text(),
    "changelog": (FIXTURE / "usr/share/doc/pkga/changelog.Debian").read_text(),
    "prose": (FIXTURE / "kjv.txt").read_text(),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(list(TEXTS.values()) * 3, vocab_size=400), out, model_max_length=256)
    return out


def documents() -> list[Document]:
    return [Document(d, f"{d}-{i}", "p", "/f", "l", t) for d, t in TEXTS.items() for i in range(2)]


def smoke_setup(tokenizer_dir: Path, use_pools: bool) -> tuple[EmoForTraining, TrainConfig, list[list[int]]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    config = replace(PRESETS["smoke"], vocab_size=tok.get_vocab_size())
    model = EmoForTraining(config)
    model.init_weights(0)
    cfg = TrainConfig(
        steps=30,
        batch_size=4,
        seq_len=64,
        lr=1e-2,
        warmup_steps=3,
        log_every=1,
        use_pools=use_pools,
        pool_min=2,
        pool_max=8,
    )
    chunks = split_chunks(tokenize(documents(), tok, special_id(tok, EOS)), cfg.seq_len)
    return model, cfg, chunks


@pytest.mark.parametrize("use_pools", [True, False], ids=["emo", "baseline"])
def test_loss_falls(tokenizer_dir: Path, use_pools: bool) -> None:
    model, cfg, chunks = smoke_setup(tokenizer_dir, use_pools)
    result = train(model, cfg, batches(chunks, cfg.batch_size, cfg.seq_len, 1, 0))
    ce = [h["ce"] for h in result.history]
    assert result.steps == 30 and result.tokens_seen > 0
    assert sum(ce[-5:]) / 5 < sum(ce[:5]) / 5 - 1.0


def test_packing_keeps_documents_apart() -> None:
    packed = pack_rows([[5, 6, 7], [8, 9], [10, 11, 12, 13]], seq_len=6, pad_id=0)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 0], [10, 11, 12, 13, 0, 0]]
    assert packed.segments.tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 1, 1]]
    # no label crosses a document boundary or points at padding
    assert packed.labels.tolist() == [[6, 7, -100, 9, -100, -100], [11, 12, 13, -100, -100, -100]]


def test_attention_never_crosses_documents(tokenizer_dir: Path) -> None:
    model, _, _ = smoke_setup(tokenizer_dir, True)
    ids = torch.randint(5, 300, (1, 12))
    alone = ids[:, 7:]
    seg = torch.tensor([[0] * 7 + [1] * 5])
    with torch.no_grad():
        packed, _ = model(ids, RoutePlan.from_segments(seg, torch.ones_like(seg, dtype=torch.bool)))
        single, _ = model(
            alone, RoutePlan.from_segments(torch.zeros_like(alone), torch.ones_like(alone).bool())
        )
    assert torch.allclose(packed[0, 7:], single[0], atol=1e-5)


def test_checkpoint_loads_in_the_serving_core_with_equal_logits(tokenizer_dir: Path, tmp_path: Path) -> None:
    from server.model.kv_cache import KVCache
    from server.model.loader import load_model

    model, cfg, chunks = smoke_setup(tokenizer_dir, True)
    train(model, replace(cfg, steps=5), batches(chunks, cfg.batch_size, cfg.seq_len, 1, 0))
    save_checkpoint(model, tmp_path, tokenizer_dir, {"test": True}, dtype=torch.float32)
    loaded = load_model(tmp_path, device="cpu", dtype=torch.float32)
    mine = load_checkpoint(tmp_path)
    ids = loaded.tokenizer.encode(TEXTS["c"])[:40]
    for pool in (None, 2, 5):
        kv = KVCache(loaded.config, 1, 64, "cpu", torch.float32)
        out = loaded.model.prefill(torch.tensor(ids), kv, 0, pool_size=pool, all_logits=True)
        x = torch.tensor(ids)[None]
        plan = RoutePlan.from_segments(torch.zeros_like(x), torch.ones_like(x, dtype=torch.bool))
        if pool is not None:
            plan.pool_sizes = torch.full((mine.config.num_layers, 1), pool)
        with torch.no_grad():
            logits, _ = mine(x, plan)
        assert torch.allclose(logits[0], out.logits, atol=1e-4)
        if pool is not None:
            assert [p[0].nonzero().flatten().tolist() for p in plan.chosen_pools] == [
                q.tolist() for q in out.pools
            ]


def test_evaluation_modes_score_the_same_targets(tokenizer_dir: Path) -> None:
    from tokenizers import Tokenizer

    model, _, _ = smoke_setup(tokenizer_dir, True)
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    cfg = EvalConfig(prefix=16, max_len=64, min_scored=8, batch_size=3)
    docs = prepare(documents(), tok, cfg)
    results = {
        m: evaluate_mode(model.eval(), docs, cfg, m, special_id(tok, PAD)) for m in ("full", "pool", "random")
    }
    assert all(results[m].tokens == results["full"].tokens for m in results)
    # every document's tokens after the prompt are scored, none before
    assert sum(results["full"].tokens.values()) == sum(len(d.ids) - cfg.prefix for d in docs)
    assert sum(results["full"].tokens.values()) > 0 and set(results["full"].tokens) == set(DOMAINS)
    pools = results["pool"].pools
    assert pools is not None and pools.shape == (
        len(docs),
        model.config.num_layers,
        model.config.routable_experts,
    )
    assert (pools.sum(dim=-1) == cfg.pool_size(8, 2)).all()


@pytest.fixture(scope="module")
def exported(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[EmoForTraining, Path]:
    """A smoke model trained until its experts differ (30 steps), and the same weights exported
    as a serving checkpoint."""
    model, cfg, chunks = smoke_setup(tokenizer_dir, True)
    train(model, cfg, batches(chunks, cfg.batch_size, cfg.seq_len, 1, 0))
    out = tmp_path_factory.mktemp("exported")
    save_checkpoint(model, out, tokenizer_dir, {"test": True}, dtype=torch.float32)
    return model.eval(), out


def serving_nll(directory: Path, ids: list[int], prefix: int, pool: int | None) -> float:
    """Summed NLL of ids[prefix:] the way a server sees the document: prefill the first `prefix`
    tokens (the pool is chosen there), then decode the rest one token at a time in that pool."""
    from server.model.kv_cache import KVCache
    from server.model.loader import load_model

    loaded = load_model(directory, device="cpu", dtype=torch.float32)
    model = loaded.model
    kv = KVCache(loaded.config, 1, len(ids), "cpu", torch.float32)
    with torch.no_grad():
        out = model.prefill(torch.tensor(ids[:prefix]), kv, 0, pool_size=pool)
        mask = None if pool is None else model.pool_mask_row(out.pools)[None]  # [1, L, E]
        logits = [out.logits[-1]]  # predicts ids[prefix]
        for pos in range(prefix, len(ids) - 1):
            step = model.decode(torch.tensor([ids[pos]]), torch.tensor([pos]), kv, torch.tensor([0]), mask)
            logits.append(step[0])
    targets = torch.tensor(ids[prefix:])
    return float(torch.nn.functional.cross_entropy(torch.stack(logits), targets, reduction="sum"))


@pytest.mark.parametrize("mode", ["pool", "full"])
def test_evaluation_scores_what_the_serving_path_scores(
    tokenizer_dir: Path, exported: tuple[EmoForTraining, Path], mode: str
) -> None:
    """The pool comes from the first `prefix` tokens only and only the tokens after them are
    scored: the evaluation's losses equal a server's prefill-then-decode losses."""
    from tokenizers import Tokenizer

    model, directory = exported
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    cfg = EvalConfig(prefix=64, max_len=96, min_scored=8, batch_size=3)
    docs = [d for d in prepare(documents(), tok, cfg) if d.name.endswith("-0")]  # "-1" is a copy
    assert {d.domain for d in docs} == set(TEXTS)
    result = evaluate_mode(model, docs, cfg, mode, special_id(tok, PAD))
    pool = cfg.pool_size(model.config.routable_experts, model.config.num_routed) if mode == "pool" else None
    for doc in docs:
        assert result.tokens[doc.domain] == len(doc.ids) - cfg.prefix  # one document per domain
        want = serving_nll(directory, doc.ids, cfg.prefix, pool)
        assert result.nll[doc.domain] == pytest.approx(want, rel=1e-4), doc.domain


def test_load_checkpoint_reads_config_json_with_the_serving_parser(tmp_path: Path) -> None:
    shipped = demo_model_dir()
    assert shipped is not None
    (tmp_path / "config.json").write_text((shipped / "config.json").read_text())
    (tmp_path / "model.safetensors").symlink_to(shipped / "model.safetensors")
    assert load_checkpoint(tmp_path).config == DemoModelConfig.from_model_config(load_config(shipped))
    raw = json.loads((shipped / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(raw | {"tie_word_embeddings": True}))
    with pytest.raises(ValueError, match=r"config\.json: the demo trainer cannot build .*tied embeddings"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(raw | {"num_hidden_layers": 0}))
    with pytest.raises(ValueError, match=r"config\.json: .*num_layers"):  # a CheckpointError
        load_checkpoint(tmp_path)


SHIPPED_EXPECTATIONS = Path(__file__).parent / "shipped_expectations.json"


@pytest.mark.parametrize("name", ["code", "licence", "manpage"])
def test_trainer_on_the_shipped_checkpoint_computes_what_serving_recorded(name: str) -> None:
    """The trainer's forward (eval, fp32) on the shipped weights, the pool voted by the prompt:
    the pools and greedy continuation serving recorded (test_shipped.py) and serving's prefill
    logits. The trainer computes norms, RoPE, experts and routing with serving's functions; this
    pins that it still computes what its own copies did (smallest top-2 margin 0.0055, largest
    logit difference to serving 8e-6 when written)."""
    from server.model.kv_cache import KVCache
    from server.model.loader import load_model

    shipped = demo_model_dir()
    assert shipped is not None
    expected = json.loads(SHIPPED_EXPECTATIONS.read_text())[name]
    prompt, size = expected["prompt_ids"], expected["pool_size"]
    model = load_checkpoint(shipped).eval()
    ids = torch.tensor(prompt + expected["token_ids"])[None]  # [1, T]
    plan = RoutePlan.from_segments(torch.zeros_like(ids), torch.ones_like(ids, dtype=torch.bool))
    plan.pool_sizes = torch.full((model.config.num_layers, 1), size)
    plan.score_mask = torch.arange(ids.shape[1]) < len(prompt)  # the prompt chooses the pool
    with torch.no_grad():
        logits, _ = model(ids, plan)
    assert [p[0].nonzero().flatten().tolist() for p in plan.chosen_pools] == expected["pools"]
    assert logits[0, len(prompt) - 1 : -1].argmax(-1).tolist() == expected["token_ids"]
    serving = load_model(shipped, device="cpu", dtype=torch.float32)
    kv = KVCache(serving.config, 1, len(prompt), "cpu", torch.float32)
    with torch.no_grad():
        out = serving.model.prefill(torch.tensor(prompt), kv, 0, pool_size=size, all_logits=True)
    assert torch.allclose(logits[0, : len(prompt)], out.logits, atol=1e-4)
