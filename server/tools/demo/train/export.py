"""Write a trained model as an EMO checkpoint directory, and read one back for evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from server.model.config import load_config
from server.model.dtypes import torch_name
from server.model.families.emo import as_written_by_authors
from server.tools.demo.train.config import DemoModelConfig
from server.tools.demo.train.model import EmoForTraining

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
WEIGHTS = "model.safetensors"


def save_checkpoint(
    model: EmoForTraining,
    out: Path,
    tokenizer_dir: Path,
    record: dict[str, Any],
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """config.json + model.safetensors + the tokenizer files + training_record.json."""
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        source = tokenizer_dir / name
        if not source.is_file():
            raise FileNotFoundError(
                f"{source}: tokenizer file missing (run `emo-serve demo train-tokenizer`)"
            )
        shutil.copyfile(source, out / name)
    generation = json.loads((out / "generation_config.json").read_text())
    config = model.config.hf_config(
        eos_token_id=generation["eos_token_id"], pad_token_id=generation["pad_token_id"], bos_token_id=None
    )
    config["torch_dtype"] = torch_name(dtype)
    (out / "config.json").write_text(json.dumps(as_written_by_authors(config), indent=2) + "\n")
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.hf_state_dict().items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / WEIGHTS).chmod(0o644)  # safetensors writes 0600; shipped package data must be world-readable
    (out / "training_record.json").write_text(json.dumps(record, indent=1) + "\n")
    return out


def load_checkpoint(directory: Path) -> EmoForTraining:
    """The checkpoint as a float32 `EmoForTraining` in eval mode."""
    parsed = load_config(directory)  # as serving reads it; a CheckpointError names file and field
    try:
        config = DemoModelConfig.from_model_config(parsed)
    except ValueError as exc:
        raise ValueError(f"{directory / 'config.json'}: {exc}") from exc
    model = EmoForTraining(config)
    tensors = load_file(str(directory / WEIGHTS))
    try:
        model.load_hf_state_dict(tensors)
    except ValueError as exc:
        raise ValueError(f"{directory / WEIGHTS}: {exc}") from exc
    return model.float().eval()
