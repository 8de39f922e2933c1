"""Weights with planted domain structure, generated tensor by tensor from (seed, tensor name).

The residual stream carries, for a token of domain d, a large component along a unit direction
u_d (one orthonormal direction per domain, plus a "mean" direction u_m every token has):

* embeddings: sqrt(H) * (EMB_DOMAIN u_d + EMB_MEAN u_m + EMB_NOISE z), z a unit vector
  orthogonal to every u (common words: no u_d, more z);
* attention: q/k read the z part (random pattern) plus one "focus" channel that makes every
  query prefer tokens with a domain component; v/o carry the domain coordinates u_j . x of the
  attended tokens back onto u_j, so common words take their context's domain. Full gain in
  layer 0 only (later layers would just pile up u_d and drown the token-specific part);
* routers: the row of an expert planted for d is (ROUTER_GAIN u_d + ROUTER_NOISE g) / sqrt(H),
  so its logit is about ROUTER_GAIN * (u_d . n(x) / sqrt(H)) above the other domains' experts;
* experts and dense MLPs write only orthogonally to the u's, with small gain: they add
  token-specific variety without eroding the domain component;
* lm_head: domain words (their space-prefixed forms) get LM_DOMAIN u_d, so text continues in
  its domain; within a domain, a seeded cycle of "successor" words (row s reads the z of its
  predecessor, and no row reads its own z) keeps greedy text from looping on a word or two;
  fillers and raw bytes get a negative u_m component so they are rarely sampled.
With RMSNorm before every reader, all logits stay bounded whatever the depth.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch

from server.tools.synth.spec import SynthSpec, TensorSpec
from server.tools.synth.vocab import COMMON, FILLER

EMB_DOMAIN, EMB_MEAN, EMB_NOISE = 0.8, 0.3, 0.5
COMMON_NOISE = math.sqrt(1.0 - EMB_MEAN**2)  # common tokens: same norm, no domain part
ATTN_SCORE = 0.5  # std of q.k / sqrt(head_dim) from the z parts
ATTN_FOCUS = 4.0  # extra attention score (nats) of a domain token as key, at layer 0
ATTN_MIX, ATTN_MIX_LATER, ATTN_NOISE, V_NOISE = 1.0, 0.1, 0.3, 0.5
ROUTER_GAIN, ROUTER_NOISE = 10.0, 1.0
EXPERT_OUT = 0.2  # rms of one expert's output relative to the residual's rms of ~1
LM_DOMAIN, LM_NOISE, LM_SELF, LM_NEXT, LM_BYTE, LM_FILLER = 8.0, 0.3, 3.0, 10.0, 10.0, 30.0
BIAS_STD = 0.02
BLOCK_ELEMS = 1 << 18  # embed / lm_head are generated in blocks of about this many values
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def seed_for(seed: int, name: str, block: int = 0) -> int:
    digest = hashlib.sha256(f"emo-synth/{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(seed: int, name: str, block: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(seed, name, block))


class PlantedWeights:
    """Builds every tensor of ``spec`` as float32 row blocks (``blocks``), each block from its
    own generator, so a block never depends on which other blocks were built before it."""

    def __init__(self, spec: SynthSpec, token_domains: list[int], output_domains: list[int]) -> None:
        c = spec.config
        self.spec, self.seed = spec, spec.seed
        self.H, self.hd = c["hidden_size"], c["head_dim"]
        self.D = len(spec.domains)
        self.domain_of = torch.tensor(token_domains, dtype=torch.long)  # [V] for embed
        self.output_domain_of = torch.tensor(output_domains, dtype=torch.long)  # [V] for lm_head
        # Orthonormal columns: u_0..u_{D-1}, then u_m.  [H, D+1]
        basis = torch.randn(self.H, self.D + 1, generator=generator(self.seed, "synth.directions"),
                            dtype=torch.float64)
        self.Q: torch.Tensor = torch.linalg.qr(basis).Q.to(torch.float32)
        self._plant_successors()
        self.planted_domain: dict[int, list[int]] = {}  # layer -> expert id -> domain (-1 none)
        for layer in spec.moe_layers:
            owner = [-1] * spec.experts_per_layer[layer]
            for d, experts in enumerate(spec.planted(layer)):
                for e in experts:
                    owner[e] = d
            self.planted_domain[layer] = owner

    def _plant_successors(self) -> None:
        """Per domain, a seeded cyclic order of its output words; lm_head row s gets the
        embedding noise of its predecessor, so greedy text walks a long cycle, not a loop."""
        rows = max(1, BLOCK_ELEMS // self.H)
        words = torch.nonzero(self.output_domain_of >= 0).flatten().tolist()
        noise = {}
        for block in sorted({i // rows for i in words}):
            z = self._token_noise(min(rows, len(self.domain_of) - block * rows), block)
            noise.update({i: z[i - block * rows] for i in words if i // rows == block})
        self.predecessor_noise: dict[int, torch.Tensor] = {}  # output id -> z of its predecessor
        for d in range(self.D):
            cycle = [i for i in words if int(self.output_domain_of[i]) == d]
            torch_order = torch.randperm(len(cycle), generator=generator(self.seed, f"synth.cycle.{d}"))
            cycle = [cycle[j] for j in torch_order.tolist()]
            for k, i in enumerate(cycle):
                self.predecessor_noise[i] = noise[cycle[k - 1]]

    def blocks(self, t: TensorSpec) -> Iterator[torch.Tensor]:
        if t.kind in ("embed", "lm_head"):
            build = self._embed if t.kind == "embed" else self._lm_head
            rows = max(1, BLOCK_ELEMS // t.shape[1])
            for b, start in enumerate(range(0, t.shape[0], rows)):
                yield build(start, min(start + rows, t.shape[0]), b)
        else:
            yield getattr(self, "_" + t.kind)(t, generator(self.seed, t.name))

    def tensor(self, t: TensorSpec) -> torch.Tensor:
        """The whole tensor (for references and tests; the writer streams ``blocks``)."""
        return torch.cat([b.reshape(-1) for b in self.blocks(t)]).reshape(t.shape)

    # ---- helpers -----------------------------------------------------------------------------
    def _perp(self, rows: int, g: torch.Generator, unit: bool = False) -> torch.Tensor:
        """[rows, H] Gaussian rows with the u directions projected out (unit norm if asked)."""
        z = torch.randn(rows, self.H, generator=g)
        z -= (z @ self.Q) @ self.Q.T
        return z / z.norm(dim=1, keepdim=True) if unit else z

    def _u(self, domains: torch.Tensor) -> torch.Tensor:
        """[N, H] rows u_{domains[i]}, zero where domains[i] < 0."""
        return self.Q.T[domains.clamp(min=0)] * (domains >= 0).float()[:, None]

    # ---- token tables ------------------------------------------------------------------------
    def _token_noise(self, rows: int, block: int) -> torch.Tensor:
        """The unit z rows of embedding block ``block`` (lm_head rebuilds them to avoid them)."""
        return self._perp(rows, generator(self.seed, EMBED, block), unit=True)

    def _embed(self, start: int, stop: int, block: int) -> torch.Tensor:
        dom = self.domain_of[start:stop]
        is_domain = (dom >= 0).float()[:, None]
        noise = EMB_NOISE * is_domain + COMMON_NOISE * (1 - is_domain)
        rows = EMB_DOMAIN * self._u(dom) + noise * self._token_noise(stop - start, block)
        return math.sqrt(self.H) * (rows + EMB_MEAN * self.Q[:, self.D])

    def _lm_head(self, start: int, stop: int, block: int) -> torch.Tensor:
        dom = self.output_domain_of[start:stop]
        noise = self._perp(stop - start, generator(self.seed, LM_HEAD, block))
        # -LM_SELF z_t: a token's own embedding noise lowers its logit, so the hidden state of
        # token t does not predict t again (greedy decoding would lock into t t t ...).
        rows = LM_DOMAIN * self._u(dom) + LM_NOISE * noise - LM_SELF * self._token_noise(stop - start, block)
        for i in range(start, stop):
            if i in self.predecessor_noise:
                rows[i - start] += LM_NEXT * self.predecessor_noise[i]
        u_m = self.Q[:, self.D]
        ids = torch.arange(start, stop)
        rows[dom == FILLER] = -LM_FILLER * u_m + 0.1 * rows[dom == FILLER]
        rows[(ids < 256) & (dom == COMMON)] -= LM_BYTE * u_m
        return rows / math.sqrt(self.H)

    # ---- attention ---------------------------------------------------------------------------
    def _q(self, t: TensorSpec, g: torch.Generator) -> torch.Tensor:
        # Focus channel: the lowest-frequency rotary pair (first coordinate hd/2 - 1), nearly
        # position independent. q reads u_m (every token has it), k reads sum_j u_j (the
        # token's domain strength), so every query attends preferentially to domain tokens.
        w = self._qk_noise(t, g)
        w[self.hd // 2 - 1 :: self.hd] = ATTN_FOCUS * math.sqrt(self.hd) / EMB_MEAN * self.Q[:, self.D]
        return w / math.sqrt(self.H)

    def _k(self, t: TensorSpec, g: torch.Generator) -> torch.Tensor:
        w = self._qk_noise(t, g)
        w[self.hd // 2 - 1 :: self.hd] = self.Q[:, : self.D].sum(dim=1) / EMB_DOMAIN
        return w / math.sqrt(self.H)

    def _qk_noise(self, t: TensorSpec, g: torch.Generator) -> torch.Tensor:
        return math.sqrt(ATTN_SCORE) * self._perp(t.shape[0], g)  # q.k / sqrt(hd) ~ N(0, ATTN_SCORE)

    def _v(self, t: TensorSpec, g: torch.Generator) -> torch.Tensor:
        w = V_NOISE * self._perp(t.shape[0], g)
        for j in range(self.D):  # coordinate j of every head carries u_j . n(x) / sqrt(H)
            w[j :: self.hd] += self.Q[:, j]
        return w / math.sqrt(self.H)

    def _o(self, t: TensorSpec, g: torch.Generator) -> torch.Tensor:
        H, width = t.shape
        heads, mix = width // self.hd, ATTN_MIX if t.layer == 0 else ATTN_MIX_LATER
        w = ATTN_NOISE / math.sqrt(width) * self._perp(width, g)  # [width, H], transposed
        for j in range(self.D):  # sum over heads of coordinate j, written back onto u_j
            w[j :: self.hd] += mix * math.sqrt(H) / heads * self.Q[:, j]
        return w.T.contiguous()

    def _bias(self, t: TensorSpec, g: torch.Generator) -> torch.Tensor:
        return BIAS_STD * torch.randn(t.shape, generator=g)

    def _norm(self, t: TensorSpec, g: torch.Generator) -> torch.Tensor:
        return torch.ones(t.shape)

    # ---- MoE / MLP ---------------------------------------------------------------------------
    def _router(self, t: TensorSpec, g: torch.Generator) -> torch.Tensor:
        owner = torch.tensor(self.planted_domain[t.layer])
        return (ROUTER_GAIN * self._u(owner) + ROUTER_NOISE * self._perp(t.shape[0], g)) / math.sqrt(self.H)

    def _expert_in(self, t: TensorSpec, g: torch.Generator) -> torch.Tensor:
        return torch.randn(t.shape, generator=g) / math.sqrt(self.H)  # pre-activations ~ N(0, 1)

    _dense_gate = _dense_up = _expert_in

    def _expert_down(self, t: TensorSpec, g: torch.Generator) -> torch.Tensor:
        # silu(a) * b with a, b ~ N(0, 1) has rms ~0.6; scale the [H] output to EXPERT_OUT rms.
        width = t.shape[1]
        return (EXPERT_OUT / 0.6 / math.sqrt(width)) * self._perp(width, g).T.contiguous()

    _dense_down = _expert_down
