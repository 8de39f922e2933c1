"""An independent, deliberately plain EMO reference for the tests: per token, per head, per
expert Python loops over weights read straight from the safetensors files (docs/emo.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


class EmoReference:
    def __init__(self, directory: Path) -> None:
        self.c: dict[str, Any] = json.loads((directory / "config.json").read_text())
        self.w: dict[str, torch.Tensor] = {}
        for f in sorted(directory.glob("*.safetensors")):
            self.w.update({k: v.float() for k, v in load_file(str(f)).items()})
        c = self.c
        L = c["num_hidden_layers"]
        self.E = c.get("num_experts_per_layer") or [c["num_experts"]] * L
        self.S = c.get("num_shared_experts_per_layer") or [
            c.get("num_shared_experts", 0) if e else 0 for e in self.E]
        self.A = c.get("always_active_experts_per_layer") or [
            list(c.get("always_active_experts") or []) if e else [] for e in self.E]

    def routable(self, layer: int) -> list[int]:
        return [e for e in range(self.E[layer] - self.S[layer]) if e not in self.A[layer]]

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.w[name] * x / torch.sqrt((x * x).mean() + self.c["rms_norm_eps"])

    def rope(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        D = x.shape[0]
        out = torch.empty_like(x)
        for i in range(D // 2):
            angle = pos * self.c["rope_theta"] ** (-2 * i / D)
            a, b = x[i], x[i + D // 2]  # rotate_half pairs i with i + D/2
            out[i] = a * math.cos(angle) - b * math.sin(angle)
            out[i + D // 2] = b * math.cos(angle) + a * math.sin(angle)
        return out

    def attention(self, xs: list[torch.Tensor], layer: int) -> list[torch.Tensor]:
        c, p = self.c, f"model.layers.{layer}.self_attn."
        H, KV = c["num_attention_heads"], c["num_key_value_heads"]
        D = c.get("head_dim") or c["hidden_size"] // H

        def proj(name: str, x: torch.Tensor) -> torch.Tensor:
            y = self.w[p + name + ".weight"] @ x
            return y + self.w[p + name + ".bias"] if c.get("attention_bias") else y

        qs = [proj("q_proj", x).view(H, D) for x in xs]
        ks = [proj("k_proj", x).view(KV, D) for x in xs]
        vs = [proj("v_proj", x).view(KV, D) for x in xs]
        qs = [torch.stack([self.rope(q[h], t) for h in range(H)]) for t, q in enumerate(qs)]
        ks = [torch.stack([self.rope(k[g], t) for g in range(KV)]) for t, k in enumerate(ks)]
        outs = []
        for t in range(len(xs)):
            heads = []
            for h in range(H):
                g = h // (H // KV)  # GQA: query head h reads kv head g
                scores = torch.stack([qs[t][h] @ ks[s][g] / math.sqrt(D) for s in range(t + 1)])
                probs = torch.softmax(scores, dim=0)
                heads.append(sum(probs[s] * vs[s][g] for s in range(t + 1)))
            outs.append(proj("o_proj", torch.cat(heads)))
        return outs

    def expert(self, x: torch.Tensor, prefix: str, bias: bool = False) -> torch.Tensor:
        def lin(name: str, v: torch.Tensor) -> torch.Tensor:
            y = self.w[f"{prefix}{name}.weight"] @ v
            return y + self.w[f"{prefix}{name}.bias"] if bias else y

        return lin("down_proj", torch.nn.functional.silu(lin("gate_proj", x)) * lin("up_proj", x))

    def route(self, logits: torch.Tensor, layer: int, pool: list[int] | None) -> list[tuple[int, float]]:
        E, S, A, K = self.E[layer], self.S[layer], self.A[layer], self.c["num_experts_per_tok"]
        blocked = set() if pool is None else set(self.routable(layer)) - set(pool)
        masked = torch.tensor([-math.inf if e in blocked else float(logits[e]) for e in range(E)])
        if S > 0:
            p = torch.softmax(masked[: E - S], dim=0)
            order = sorted(range(E - S), key=lambda e: (-float(p[e]), e))[: K - S]
            p_sh = torch.softmax(logits[E - S:], dim=0)
            return [(e, float(p[e])) for e in order] + [(E - S + i, float(p_sh[i])) for i in range(S)]
        p = torch.softmax(masked, dim=0)
        if A:
            outside = [e for e in range(E) if e not in A]
            order = sorted(outside, key=lambda e: (-float(p[e]), e))[: K - len(A)]
            return [(e, float(p[e])) for e in order + sorted(A)]
        order = sorted(range(E), key=lambda e: (-float(p[e]), e))[:K]
        total = sum(float(p[e]) for e in order) if self.c.get("norm_topk_prob") else 1.0
        return [(e, float(p[e]) / total) for e in order]

    def select_pool(self, logits: list[torch.Tensor], layer: int, size: int) -> list[int]:
        R = self.routable(layer)
        score = {e: 0.0 for e in R}
        for lg in logits:
            p = torch.softmax(torch.stack([lg[e] for e in R]), dim=0)
            for i, e in enumerate(R):
                score[e] += float(p[i])
        return sorted(sorted(R, key=lambda e: (-score[e], e))[:size])

    def forward(self, ids: list[int], pool_size: int | None = None, prompt_len: int | None = None,
                given: list[list[int] | None] | None = None) -> tuple[torch.Tensor, list[list[int] | None]]:
        """Logits [T, V] for ids; pools chosen layer by layer from the first prompt_len tokens
        (or ``given`` per layer) and then applied to every token."""
        prompt_len = prompt_len or len(ids)
        xs = [self.w["model.embed_tokens.weight"][i] for i in ids]
        pools: list[list[int] | None] = []
        for layer in range(self.c["num_hidden_layers"]):
            hs, ns, logits = self._attend(xs, layer)
            if logits is None:
                xs = self._dense(hs, ns, layer)
                pools.append(None)
                continue
            pool = None if pool_size is None else self.select_pool(logits[:prompt_len], layer, pool_size)
            if given is not None:
                pool = given[layer]
            pools.append(pool)
            xs = self._moe(hs, ns, logits, layer, pool)
        final = torch.stack([self.norm(x, "model.norm.weight") for x in xs])
        return final @ self.w["lm_head.weight"].T, pools

    def pools_from_examples(self, examples: list[list[int]], pool_size: int) -> list[list[int] | None]:
        """One pool per layer from the router probabilities of every token of every example,
        each example running the layer restricted to that pool before the next layer."""
        states = [[self.w["model.embed_tokens.weight"][i] for i in ids] for ids in examples]
        pools: list[list[int] | None] = []
        for layer in range(self.c["num_hidden_layers"]):
            steps = [self._attend(xs, layer) for xs in states]
            if steps[0][2] is None:
                states = [self._dense(hs, ns, layer) for hs, ns, _ in steps]
                pools.append(None)
                continue
            every_token = [lg for _, _, logits in steps for lg in logits or []]
            pool = self.select_pool(every_token, layer, pool_size)
            pools.append(pool)
            states = [self._moe(hs, ns, logits or [], layer, pool) for hs, ns, logits in steps]
        return pools

    def _attend(self, xs: list[torch.Tensor], layer: int
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None]:
        p = f"model.layers.{layer}."
        attn = self.attention([self.norm(x, p + "pre_attention_layernorm.weight") for x in xs], layer)
        hs = [x + a for x, a in zip(xs, attn, strict=True)]
        ns = [self.norm(h, p + "pre_feedforward_layernorm.weight") for h in hs]
        logits = None if self.E[layer] == 0 else [self.w[p + "mlp.gate.weight"] @ n for n in ns]
        return hs, ns, logits

    def _dense(self, hs: list[torch.Tensor], ns: list[torch.Tensor], layer: int) -> list[torch.Tensor]:
        p = f"model.layers.{layer}."
        return [h + self.expert(n, p + "mlp.", bias=bool(self.c.get("dense_mlp_bias")))
                for h, n in zip(hs, ns, strict=True)]

    def _moe(self, hs: list[torch.Tensor], ns: list[torch.Tensor], logits: list[torch.Tensor], layer: int,
             pool: list[int] | None) -> list[torch.Tensor]:
        xs = []
        for h, n, lg in zip(hs, ns, logits, strict=True):
            out = torch.zeros_like(h)
            for e, weight in self.route(lg, layer, pool):
                out += weight * self.expert(n, f"model.layers.{layer}.mlp.experts.{e}.")
            xs.append(h + out)
        return xs
