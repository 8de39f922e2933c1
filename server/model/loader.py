"""Load a checkpoint directory: validate everything on the host, then build on the device.

Order: config -> tokenizer -> safetensors headers -> every expected tensor's presence, shape
and dtype -> catalog -> trunk read into CPU memory -> expert store -> trunk moved to device.
Any error before the store is created leaves nothing allocated on the device; an error after
it closes the store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from expert_cache.base import ExpertCatalog, ExpertStore
from expert_cache.errors import CheckpointError
from expert_cache.resident import ResidentExpertStore
from expert_cache.safetensors_index import SafetensorsIndex
from server.model.config import ModelConfig, load_config
from server.model.devices import resolve_device
from server.model.dtypes import COMPUTE_DTYPES, resolve_dtype
from server.model.model import MoETransformer
from server.model.tokenizer import TokenizerBundle, generation_defaults, load_tokenizer
from server.model.weights import build_catalog, expected_tensors, read_trunk

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass
class LoadedModel:
    model: MoETransformer
    config: ModelConfig
    tokenizer: TokenizerBundle
    catalog: ExpertCatalog
    checkpoint_dir: Path
    generation_defaults: dict[str, Any] = field(default_factory=dict)


def compute_dtype(dtype: torch.dtype | str | None, device: torch.device, index: SafetensorsIndex,
                  config: ModelConfig) -> torch.dtype:
    """None: the checkpoint's own dtype (its embedding's), when it is a compute dtype; a name means
    what it means for every command (server/model/dtypes.py: 'auto' follows the device)."""
    if dtype is not None:
        return resolve_dtype(dtype, device)
    # validate_tensors has already refused weights that are not in a compute dtype
    return index.info(config.names.embed).dtype if config.names.embed in index else torch.float32


def _refuse_pickle(directory: Path) -> None:
    if any(directory.glob("*.safetensors")) or (directory / "model.safetensors.index.json").exists():
        return
    pickles = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            pickles[0],
            "only pickle weight files (.bin/.pt/.pth) found; they are never unpickled here. Convert "
            "the checkpoint to safetensors, e.g. load it with transformers and call "
            "model.save_pretrained(out_dir, safe_serialization=True)",
        )


def validate_tensors(config: ModelConfig, index: SafetensorsIndex, directory: Path) -> None:
    """Every expected tensor is present with its exact shape and a float dtype."""
    index_json = directory / "model.safetensors.index.json"
    files = sorted(directory.glob("*.safetensors"))
    where = index_json if index_json.exists() else (files[0] if len(files) == 1 else directory)
    for name, shape in expected_tensors(config).items():
        if name not in index:
            raise CheckpointError(where, f"missing tensor (expected shape {list(shape)})", name)
        info = index.info(name)
        if info.shape != shape:
            raise CheckpointError(
                info.path, f"wrong shape {list(info.shape)}, expected {list(shape)}", name
            )
        if info.dtype not in COMPUTE_DTYPES.values():
            raise CheckpointError(
                info.path, f"wrong dtype {info.dtype}, expected float32, bfloat16 or float16", name
            )


def load_model(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    expert_store_factory: Callable[[ExpertCatalog], ExpertStore] | None = None,
) -> LoadedModel:
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(directory, "not a checkpoint directory")
    dev = resolve_device(device)
    _refuse_pickle(directory)
    config = load_config(directory)
    tokenizer = load_tokenizer(directory, config.bos_token_id, config.eos_token_ids)
    if tokenizer.tokenizer.get_vocab_size() > config.vocab_size:
        raise CheckpointError(
            directory / "tokenizer.json",
            f"tokenizer has {tokenizer.tokenizer.get_vocab_size()} tokens but config vocab_size is "
            f"{config.vocab_size}",
        )
    # config.json defaults sometimes name ids outside the vocabulary (e.g. OLMoE's 50279)
    tokenizer.eos_token_ids = [i for i in tokenizer.eos_token_ids if 0 <= i < config.vocab_size]
    index = SafetensorsIndex.from_directory(directory)
    validate_tensors(config, index, directory)
    weights_dtype = compute_dtype(dtype, dev, index, config)
    catalog = build_catalog(config, index, weights_dtype)
    trunk = read_trunk(config, index, weights_dtype)  # host memory only
    store = (expert_store_factory or (lambda c: ResidentExpertStore(c, dev)))(catalog)
    try:
        model = MoETransformer(config, {k: v.to(dev) for k, v in trunk.items()}, store)
    except BaseException:
        store.close()  # e.g. the trunk does not fit the device: stop the store's threads too
        raise
    model.eval()
    return LoadedModel(
        model=model,
        config=config,
        tokenizer=tokenizer,
        catalog=catalog,
        checkpoint_dir=directory,
        generation_defaults=generation_defaults(directory),
    )
