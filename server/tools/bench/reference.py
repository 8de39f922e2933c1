"""The Hugging Face reference on the same checkpoint: the EMO authors' modeling file
(``--reference-modeling PATH``, e.g. their modeling_emo.py) loaded with transformers, timed on
one prompt (prefill = time to first token) and greedy batch-1 decoding with its KV cache.

Its siblings (configuration_*.py) are imported as one throwaway package so that the file's
relative imports work. Nothing is downloaded; any failure becomes a note, not a crash.
"""

from __future__ import annotations

import importlib
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from server.model.config import load_config
from server.model.dtypes import COMPUTE_DTYPES
from server.model.tokenizer import load_tokenizer
from server.tools.bench.config import RESIDENT, DecodeBenchConfig
from server.tools.bench.scenario import ScenarioResult
from server.tools.bench.workload import domain_prompt


def _model_class(modeling: Path, package_dir: Path) -> Any:
    import transformers

    package = f"emo_bench_reference_{abs(hash(str(modeling))) % 10**8}"
    target = package_dir / package
    target.mkdir()
    for source in modeling.parent.glob("*.py"):
        shutil.copy(source, target / source.name)
    (target / "__init__.py").touch()
    sys.path.insert(0, str(package_dir))
    try:
        module = importlib.import_module(f"{package}.{modeling.stem}")
    finally:
        sys.path.remove(str(package_dir))
    found = [obj for obj in vars(module).values()
             if isinstance(obj, type) and issubclass(obj, transformers.PreTrainedModel)
             and obj.__name__.endswith("ForCausalLM")]
    if not found:
        raise ValueError(f"{modeling}: no *ForCausalLM class (a transformers PreTrainedModel) in it")
    return found[0]


def _timed(device: torch.device, fn: Any) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


@torch.inference_mode()
def hf_reference(cfg: DecodeBenchConfig, model_dir: Path) -> ScenarioResult:
    result = ScenarioResult("hf-reference", "hf", RESIDENT, 0)
    if cfg.reference_modeling is None:
        result.skipped = "no --reference-modeling PATH given"
        return result
    try:
        import transformers  # noqa: F401
    except ImportError:
        result.skipped = "transformers is not installed"
        return result
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cls = _model_class(Path(cfg.reference_modeling), Path(tmp))
            config = cls.config_class.from_pretrained(model_dir)
            dtype = COMPUTE_DTYPES[cfg.dtype]
            model = cls.from_pretrained(model_dir, config=config, dtype=dtype).to(device).eval()
        mc = load_config(model_dir)
        tokenizer = load_tokenizer(model_dir, mc.bos_token_id, mc.eos_token_ids)
        ids = torch.tensor([domain_prompt(tokenizer, 1, cfg.prompt_tokens, cfg.seed + 1)], device=device)
        out, result.ttft_warm_s = _timed(device, lambda: model(input_ids=ids, use_cache=True))
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

        def decode() -> None:
            nonlocal past, token
            for _ in range(cfg.decode_tokens - 1):
                step = model(input_ids=token, past_key_values=past, use_cache=True)
                past, token = step.past_key_values, step.logits[:, -1:].argmax(-1)

        _, seconds = _timed(device, decode)
        result.decode_tps_b1 = (cfg.decode_tokens - 1) / seconds if seconds > 0 else math.nan
        result.device_slots = sum(len(mc.routable_experts(layer)) for layer in mc.moe_layers)
        if device.type == "cuda":
            result.peak_device_bytes = torch.cuda.max_memory_allocated(device)
        result.notes.append("batch-1 only: prefill time is its TTFT (warm), no concurrent run")
    except Exception as e:  # noqa: BLE001 - a broken reference file must not lose the other rows
        result.skipped = f"reference failed: {type(e).__name__}: {e}"
    return result
