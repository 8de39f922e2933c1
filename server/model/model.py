"""The decoder shared by every family: prefill (one prompt into a KV slot) and batched decode."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from expert_cache.base import ExpertKey, ExpertStore
from expert_cache.resident import ResidentExpertStore
from server.model.attention import Attention, decode_mask
from server.model.config import ModelConfig
from server.model.decode_graphs import GraphedDecode
from server.model.decode_step import DecodeStep, attend_bucket
from server.model.kv_cache import KVCache
from server.model.layers import RMSNorm, SwiGLU, as_float, frozen
from server.model.moe import ExpertPlan, MoEBlock
from server.model.pool import pool_mask, pool_scores, routable_index, select_pool
from server.model.rope import RotaryEmbedding
from server.model.routing import Routes, route
from server.model.weights import build_layer_modules


@dataclass
class PrefillOutput:
    logits: torch.Tensor  # float32 [T, V] (all_logits) or [1, V]
    pools: list[torch.Tensor | None] | None  # per layer sorted pool ids; None: dense / full routing
    pinned: list[ExpertKey]  # pin_pool=True: pins the caller owns and must release
    pinned_slots: list[int] = field(default_factory=list)  # the slab slot of each pinned key


@dataclass(eq=False)
class PrefillState:
    """A prompt part-way through the layers (see ``MoETransformer.prefill_start``)."""

    kv: KVCache
    slot: int
    pool_size: int | None
    all_logits: bool
    cos: torch.Tensor
    sin: torch.Tensor
    x: torch.Tensor  # [T, H] input of ``layer`` (after the last layer: the final hidden states)
    pools: list[torch.Tensor | None] | None  # one entry per layer attended so far
    layer: int = 0  # the layer being computed
    num_layers: int = 0  # of the model
    h: torch.Tensor | None = None  # [T, H] the layer's residual after attention (once attended)
    normed: torch.Tensor | None = None  # [T, H] its MLP input
    router: torch.Tensor | None = None  # [T, E] its router logits (MoE layers)
    allowed: torch.Tensor | None = None  # [1, E] its pool (pool requests at MoE layers)
    routes: Routes | None = None  # the layer's routing of every token (MoE layers)
    plan: ExpertPlan | None = None  # its picks grouped by expert
    acc: torch.Tensor | None = None  # float32 [T, H] the routed sum so far
    experts_done: int = 0  # experts of ``plan`` already added to ``acc``
    next_predicted: list[ExpertKey] = field(default_factory=list)
    given_pools: list[torch.Tensor | None] | None = None  # pools given per layer (named pools)
    given_ids: list[list[int]] | None = None  # the same on the host

    @property
    def num_tokens(self) -> int:
        return int(self.x.shape[0])

    @property
    def attended(self) -> bool:
        return self.h is not None

    @property
    def done(self) -> bool:
        return self.layer >= self.num_layers

    def finish_layer(self, out: torch.Tensor) -> None:
        self.x, self.layer, self.experts_done = out, self.layer + 1, 0
        self.h = self.normed = self.router = self.allowed = self.acc = None
        self.routes, self.plan = None, None


class DecoderLayer(nn.Module):
    def __init__(self, attn_norm: RMSNorm, attn: Attention, mlp_norm: RMSNorm,
                 mlp: MoEBlock | SwiGLU) -> None:
        super().__init__()
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp


class MoETransformer(nn.Module):
    def __init__(
        self, config: ModelConfig, tensors: dict[str, torch.Tensor], expert_store: ExpertStore
    ) -> None:
        """``tensors``: the trunk by checkpoint name (see weights.read_trunk), on the target
        device in the compute dtype. Routable experts live only in ``expert_store``."""
        super().__init__()
        self.config, self.expert_store = config, expert_store
        names = config.names
        self.embed = frozen(tensors[names.embed])  # [V, H]
        self.lm_head = self.embed if config.tie_word_embeddings else frozen(tensors[names.lm_head])
        self.norm = RMSNorm(tensors[names.final_norm], config.rms_norm_eps)
        # A typed view of ``self.layers`` (ModuleList iterates as plain ``nn.Module``).
        self.decoder_layers: list[DecoderLayer] = [
            DecoderLayer(*build_layer_modules(config, layer, tensors, expert_store))
            for layer in range(config.num_layers)
        ]
        self.layers = nn.ModuleList(self.decoder_layers)
        self.rope = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)
        self.rope.to(self.embed.device)
        # Decode through DecodeStep (slot tables, no store calls, static shapes) wherever the
        # experts a row may pick are on the device for the whole request: pool rows (pinned at
        # prefill) and every row of a resident store. False: always the eager paging path.
        self.fast_decode = True
        self._step: DecodeStep | None = None
        self._graphs: GraphedDecode | None = None
        self._resident_table: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return as_float(F.linear(self.norm(x), self.lm_head))

    @torch.inference_mode()
    def prefill(
        self,
        input_ids: torch.Tensor,
        kv: KVCache,
        slot: int,
        *,
        pool_size: int | None,
        pin_pool: bool = False,
        all_logits: bool = False,
        given_pools: Sequence[torch.Tensor | None] | None = None,
    ) -> PrefillOutput:
        """The whole prompt in one call: the layer-range API below run layer after layer, with
        each layer's pool acquired here (blocking on its loads). ``given_pools`` (per layer,
        e.g. a named pool): used as they are instead of being chosen from this prompt; each MoE
        layer's must hold ``pool_size`` routable ids."""
        state = self.prefill_start(input_ids, kv, slot, pool_size=pool_size, all_logits=all_logits,
                                   given_pools=given_pools)
        pinned: list[ExpertKey] = []
        pinned_slots: list[int] = []
        try:
            while not state.done:
                pool_keys = self.prefill_attend(state)
                if pool_keys and pin_pool:
                    pinned_slots.extend(self.expert_store.acquire_slots(pool_keys))
                    pinned.extend(pool_keys)
                if state.next_predicted:
                    self.expert_store.prefetch(state.next_predicted)
                while state.attended:
                    self.prefill_mlp(state, state.num_tokens * self.config.max_experts)
            logits = self.prefill_logits(state)
        except BaseException:
            if pinned:
                self.expert_store.release(pinned)
            raise
        return PrefillOutput(logits, state.pools, pinned, pinned_slots)

    # ---- the layer-range prefill ------------------------------------------------------------
    # A prompt advances one layer at a time in two phases: ``prefill_attend`` (attention over
    # the whole prompt, the router, and for pool requests the layer's pool: it needs every
    # token's router output) and ``prefill_mlp`` (the MLP / MoE, in token chunks: once the
    # pool is fixed each token's routing is its own). Between calls the caller may run other
    # work and make the layer's pool resident. Run end to end it is exactly ``prefill``.

    @torch.inference_mode()
    def prefill_start(
        self, input_ids: torch.Tensor, kv: KVCache, slot: int, *, pool_size: int | None,
        all_logits: bool = False, given_pools: Sequence[torch.Tensor | None] | None = None,
    ) -> PrefillState:
        T = int(input_ids.shape[0])
        if input_ids.dim() != 1 or T == 0:
            raise ValueError(f"prefill needs a non-empty 1-D input_ids, got shape {tuple(input_ids.shape)}")
        kv.check_positions(T - 1)
        if pool_size is not None:
            self.config.validate_pool_size(pool_size)
        given_ids: list[list[int]] | None = None  # the given pools on the host, for pins and prefetch
        checked: list[torch.Tensor | None] | None = None
        if given_pools is not None:
            if pool_size is None:
                raise ValueError("prefill: given_pools needs pool_size")
            checked, given_ids = self._check_pools(given_pools, pool_size)
        positions = torch.arange(T, device=self.device)
        cos, sin = self.rope(positions, torch.full_like(positions, T), self.dtype)
        x = F.embedding(input_ids.to(self.device), self.embed)  # [T, H]
        return PrefillState(kv, slot, pool_size, all_logits, cos, sin, x,
                            pools=None if pool_size is None else [], num_layers=self.config.num_layers,
                            given_pools=checked, given_ids=given_ids)

    @torch.inference_mode()
    def prefill_attend(self, state: PrefillState) -> list[ExpertKey]:
        """Attention of ``state.layer`` over the whole prompt and its router; returns the keys of
        the layer's pool (pool requests at MoE layers; else []), which must be resident before
        ``prefill_mlp`` runs the layer. Sets ``state.next_predicted``: the next MoE layer's pool
        as predicted from this layer's hidden states, for the caller to prefetch."""
        if state.done or state.attended:
            raise RuntimeError(f"prefill_attend: layer {state.layer} is done or already attended")
        index, x = state.layer, state.x
        layer = self.decoder_layers[index]
        h = x + layer.attn.prefill(layer.attn_norm(x), state.cos, state.sin, state.kv, state.slot)
        state.h, state.normed = h, layer.mlp_norm(h)
        state.next_predicted = []
        mlp = layer.mlp
        if not isinstance(mlp, MoEBlock):
            if state.pools is not None:
                state.pools.append(None)
            return []
        state.router = mlp.router_logits(state.normed)  # [T, E]
        if state.pools is None or state.pool_size is None:
            return []
        given = None if state.given_pools is None else state.given_pools[index]
        pool = (select_pool(pool_scores(state.router, mlp.spec), mlp.spec, state.pool_size)
                if given is None else given)
        state.pools.append(pool)
        state.allowed = pool_mask(pool, mlp.spec, mlp.spec.num_experts)[None, :]
        state.next_predicted = self._predict_next(index, h, state.pool_size, state.given_ids)
        ids = pool.tolist() if state.given_ids is None else state.given_ids[index]
        return [(index, e) for e in ids]

    @torch.inference_mode()
    def prefill_routed_keys(self, state: PrefillState) -> list[ExpertKey]:
        """The distinct routable experts the attended MoE layer's tokens chose (full routing:
        the experts the layer will page in), routing them now; [] for dense layers."""
        mlp = self.decoder_layers[state.layer].mlp
        if not isinstance(mlp, MoEBlock) or state.normed is None:
            return []
        self._plan(state, mlp, state.normed)
        assert state.plan is not None
        return [(state.layer, e) for e in state.plan.expert_ids]

    def _plan(self, state: PrefillState, mlp: MoEBlock, normed: torch.Tensor) -> None:
        if state.plan is None:
            router = state.router if state.router is not None else mlp.router_logits(normed)
            state.routes = route(router, mlp.spec, state.allowed)
            state.plan = mlp.plan(state.routes)
            state.acc = torch.zeros(state.num_tokens, normed.shape[1], dtype=torch.float32,
                                    device=normed.device)

    @torch.inference_mode()
    def prefill_mlp(self, state: PrefillState, max_rows: int) -> int:
        """Run more of the attended layer's MLP: routed experts in expert order until about
        ``max_rows`` token rows are computed (at least one expert; a dense layer or the fixed
        and shared experts count T rows and run whole). Moves to the next layer when the layer
        is complete. Returns the rows computed.

        The split is by experts, not by tokens: a token chunk changes the shapes of the matrix
        products and so the last bits of the result, an expert group does not (each expert
        sees the rows it sees in one call, sums run in expert order), so any split gives
        exactly ``prefill``'s numbers."""
        h, normed = state.h, state.normed
        if h is None or normed is None:
            raise RuntimeError(f"prefill_mlp: layer {state.layer} has not been attended")
        mlp, T = self.decoder_layers[state.layer].mlp, state.num_tokens
        if not isinstance(mlp, MoEBlock):
            state.finish_layer(h + mlp(normed))
            return T
        self._plan(state, mlp, normed)
        assert state.plan is not None and state.routes is not None and state.acc is not None
        plan, first = state.plan, state.experts_done
        n = len(plan.expert_ids)
        stop = first + 1
        while stop < n and plan.rows(first, stop + 1) <= max_rows:
            stop += 1
        stop = min(stop, n)
        if first < stop:
            mlp.run_experts(normed, plan, state.acc, first, stop)
        state.experts_done = stop
        rows = plan.rows(first, stop) if first < stop else 0
        if stop == n:
            state.finish_layer(h + mlp.finish(normed, state.routes, state.acc))
            rows += T
        return rows

    @torch.inference_mode()
    def prefill_logits(self, state: PrefillState) -> torch.Tensor:
        """float32 logits [T, V] (all_logits) or [1, V] of a finished prefill."""
        if not state.done:
            raise RuntimeError(f"prefill_logits: layer {state.layer} of {self.config.num_layers} is next")
        return self.logits(state.x if state.all_logits else state.x[-1:])

    def _predict_next(self, index: int, h: torch.Tensor, pool_size: int,
                      given_ids: list[list[int]] | None = None) -> list[ExpertKey]:
        """The next MoE layer's pool: the given one when there is one, else its router on this
        layer's hidden states (the true pool needs this layer's output, which is not computed
        yet)."""
        for nxt in range(index + 1, len(self.decoder_layers)):
            layer = self.decoder_layers[nxt]
            if isinstance(layer.mlp, MoEBlock):
                if given_ids is not None:
                    return [(nxt, e) for e in given_ids[nxt]]
                logits = layer.mlp.router_logits(layer.mlp_norm(h))
                predicted = select_pool(pool_scores(logits, layer.mlp.spec), layer.mlp.spec, pool_size)
                return [(nxt, e) for e in predicted.tolist()]
        return []

    def _check_pools(self, pools: Sequence[torch.Tensor | None], pool_size: int
                     ) -> tuple[list[torch.Tensor | None], list[list[int]]]:
        """Given pools on the device and as host lists ([] for dense layers), after checking
        them against the layers: each MoE layer's is ``pool_size`` distinct routable ids, dense
        layers have None."""
        if len(pools) != self.config.num_layers:
            raise ValueError(f"given pools: one entry per layer ({self.config.num_layers}), got {len(pools)}")
        checked: list[torch.Tensor | None] = []
        host: list[list[int]] = []
        for index, (layer, pool) in enumerate(zip(self.decoder_layers, pools, strict=True)):
            if not isinstance(layer.mlp, MoEBlock):
                if pool is not None:
                    raise ValueError(f"given pools: layer {index} is dense, its pool must be None")
                checked.append(None)
                host.append([])
                continue
            ids = [] if pool is None else pool.tolist()  # given on the host: no device sync
            routable = set(layer.mlp.spec.routable)
            if len(ids) != pool_size or len(set(ids)) != pool_size or not set(ids) <= routable:
                raise ValueError(f"given pools: layer {index} needs {pool_size} distinct routable "
                                 f"expert ids, got {ids}")
            host.append(sorted(ids))
            checked.append(torch.tensor(host[-1], dtype=torch.long, device=self.device))
        return checked, host

    @torch.inference_mode()
    def pools_from_examples(self, examples: Sequence[torch.Tensor],
                            pool_size: int) -> list[torch.Tensor | None]:
        """EMO's serving rule over several prompts at once: at each MoE layer the scores of
        every example's tokens are summed, one pool is chosen from the sum, and every example
        then runs that layer restricted to it (so the next layer sees pool-restricted inputs,
        as a prefill does). One example gives exactly the pools its prefill would choose.

        Each example runs attention and MoE on its own, so the working memory is that of one
        prefill of the longest example, plus the hidden states of all examples. Nothing is
        cached and nothing stays pinned."""
        self.config.validate_pool_size(pool_size)
        if not examples or any(e.dim() != 1 or e.shape[0] == 0 for e in examples):
            raise ValueError("pools_from_examples needs one or more non-empty 1-D token tensors")
        longest = max(int(e.shape[0]) for e in examples)
        if longest > self.config.max_position_embeddings:
            raise ValueError(f"an example has {longest} tokens, more than max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        ropes = []
        for ids in examples:
            positions = torch.arange(int(ids.shape[0]), device=self.device)
            ropes.append(self.rope(positions, torch.full_like(positions, int(ids.shape[0])), self.dtype))
        xs = [F.embedding(ids.to(self.device), self.embed) for ids in examples]  # [T_i, H] each
        pools: list[torch.Tensor | None] = []
        for layer in self.decoder_layers:
            hs = [x + layer.attn.prefill(layer.attn_norm(x), cos, sin, None, 0)
                  for x, (cos, sin) in zip(xs, ropes, strict=True)]
            normed = [layer.mlp_norm(h) for h in hs]
            mlp = layer.mlp
            if not isinstance(mlp, MoEBlock):
                xs = [h + mlp(n) for h, n in zip(hs, normed, strict=True)]
                pools.append(None)
                continue
            logits = [mlp.router_logits(n) for n in normed]  # [T_i, E] each
            scores = torch.stack([pool_scores(lg, mlp.spec) for lg in logits]).sum(dim=0)  # [|R|]
            pool = select_pool(scores, mlp.spec, pool_size)
            pools.append(pool)
            allowed = pool_mask(pool, mlp.spec, mlp.spec.num_experts)[None, :]
            xs = [h + mlp(n, lg, allowed) for h, n, lg in zip(hs, normed, logits, strict=True)]
        return pools

    @torch.inference_mode()
    def decode(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv: KVCache,
        slots: torch.Tensor,
        pool_mask: torch.Tensor | None,
        slot_tables: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One token per row; returns float32 logits [B, V].

        With ``fast_decode`` this runs the DecodeStep when the rows' experts stay on the device:
        ``slot_tables`` [B, L, E_max] int32 given (rows whose pools were pinned at prefill), or a
        resident store (tables made from ``pool_mask``). Otherwise the eager path pages experts
        in through the store (full routing on a partial device tier)."""
        B = int(input_ids.shape[0])
        if positions.shape != (B,) or slots.shape != (B,) or B == 0:
            raise ValueError(
                f"decode needs input_ids, positions, slots of one shape [B], got "
                f"{tuple(input_ids.shape)}, {tuple(positions.shape)}, {tuple(slots.shape)}"
            )
        if pool_mask is not None and pool_mask.shape != (B, self.config.num_layers, self.config.max_experts):
            raise ValueError(
                f"pool_mask must be [B, L, E_max] = [{B}, {self.config.num_layers}, "
                f"{self.config.max_experts}], got {tuple(pool_mask.shape)}"
            )
        if self.fast_decode and (slot_tables is not None or self.resident_table() is not None):
            return self._decode_step(input_ids, positions, kv, slots, pool_mask, slot_tables)
        attend_len = int(positions.max()) + 1  # the engine passes host tensors: no device sync
        kv.check_positions(attend_len - 1)
        positions, slots = positions.to(self.device), slots.to(self.device)
        cos, sin = self.rope(positions, positions + 1, self.dtype)
        x = F.embedding(input_ids.to(self.device), self.embed)  # [B, H]
        mask = None if pool_mask is None else pool_mask.to(self.device)
        visible = decode_mask(positions, attend_len)  # the same for every layer
        for index, layer in enumerate(self.decoder_layers):
            h = x + layer.attn.decode(layer.attn_norm(x), cos, sin, kv, slots, positions, attend_len, visible)
            normed = layer.mlp_norm(h)
            if isinstance(layer.mlp, MoEBlock):
                allowed = None if mask is None else mask[:, index, : layer.mlp.spec.num_experts]
                x = h + layer.mlp(normed, allowed=allowed)
            else:
                x = h + layer.mlp(normed)
        return self.logits(x)

    def _decode_step(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVCache, slots: torch.Tensor,
                     pool_mask: torch.Tensor | None, slot_tables: torch.Tensor | None) -> torch.Tensor:
        B = int(input_ids.shape[0])
        if slot_tables is None:
            slot_tables = self.tables_from_mask(pool_mask, B)
        # positions are host tensors for every caller that cares (the engine): reading them is
        # no device sync
        host_positions = positions.tolist()
        graphs = self._graphs
        if graphs is not None and graphs.step.kv is kv and graphs.buckets[-1] >= B:
            return graphs.run(input_ids.tolist(), host_positions, slots.tolist(), self._here(slot_tables))
        step = self.decode_step(kv)
        step.check(B, slot_tables)
        attend_len = attend_bucket(max(host_positions) + 1, kv.max_len)
        return step(self._here(input_ids), self._here(positions), self._here(slots), self._here(slot_tables),
                    attend_len)

    def _here(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self.device else t.to(self.device)

    def decode_step(self, kv: KVCache) -> DecodeStep:
        """The DecodeStep over ``kv`` (made once per cache)."""
        if self._step is None or self._step.kv is not kv:
            self._step = DecodeStep(self, kv)
        return self._step

    def capture_decode_graphs(self, kv: KVCache, max_batch: int, compile_step: bool = False) -> None:
        """CUDA: capture the decode step over ``kv`` as graphs for batches up to ``max_batch``;
        ``decode`` replays them from then on. Refused on other devices."""
        self._graphs = GraphedDecode(self.decode_step(kv), max_batch, compile_step=compile_step)

    def resident_table(self) -> torch.Tensor | None:
        """int32 [L, E_max]: the slot table of full routing when every expert stays on the
        device (a ResidentExpertStore: slots fixed at load); None when the store pages."""
        store = self.expert_store
        if not isinstance(store, ResidentExpertStore):
            return None
        if self._resident_table is None:
            keys = [(layer, e) for layer in self.config.moe_layers
                    for e in self.config.routable_experts(layer)]
            slots = dict(zip(keys, store.slots_of(keys), strict=True))
            self._resident_table = self.slot_table_row(None, slots)
        return self._resident_table

    def slot_table_row(self, pools: list[torch.Tensor | None] | None,
                       slot_of: dict[ExpertKey, int]) -> torch.Tensor:
        """int32 [L, E_max] on the device for one sequence: ``slot_of[(l, e)]`` for each routable
        expert it may pick (its pool, or every routable expert when ``pools`` is None), -1 for
        the routable experts outside its pool, 0 for fixed experts and padding."""
        L, width = self.config.num_layers, self.config.max_experts
        if pools is not None and len(pools) != L:
            raise ValueError(f"pools must have one entry per layer ({L}), got {len(pools)}")
        table = torch.zeros(L, width, dtype=torch.int32)
        for layer in self.config.moe_layers:
            pool = None if pools is None else pools[layer]
            allowed = self.config.routable_experts(layer) if pool is None else pool.tolist()
            table[layer, self.config.routable_experts(layer)] = -1
            table[layer, allowed] = torch.tensor([slot_of[(layer, e)] for e in allowed], dtype=torch.int32)
        return table.to(self.device)

    def tables_from_mask(self, pool_mask: torch.Tensor | None, batch: int) -> torch.Tensor:
        """[B, L, E_max] slot tables of a resident store from pool masks (see ``decode``)."""
        full = self.resident_table()
        if full is None:
            raise ValueError("slot tables from pool masks need a resident expert store")
        if pool_mask is None:
            return full.expand(batch, -1, -1)
        routable = torch.zeros_like(full, dtype=torch.bool)
        for layer in self.config.moe_layers:
            mlp = self.decoder_layers[layer].mlp
            assert isinstance(mlp, MoEBlock)
            routable[layer, routable_index(mlp.spec, self.device)] = True
        keep = pool_mask.to(self.device) | ~routable  # fixed experts are never masked
        return torch.where(keep, full, torch.full_like(full, -1))

    def pool_mask_row(self, pools: list[torch.Tensor | None] | None) -> torch.Tensor:
        """[L, E_max] bool for one sequence: its pools (from prefill), all True for full routing."""
        L, width = self.config.num_layers, self.config.max_experts
        rows = torch.ones(L, width, dtype=torch.bool, device=self.device)
        if pools is None:
            return rows
        if len(pools) != L:
            raise ValueError(f"pools must have one entry per layer ({L}), got {len(pools)}")
        for index, pool in enumerate(pools):
            layer = self.decoder_layers[index]
            if pool is not None and isinstance(layer.mlp, MoEBlock):
                rows[index] = pool_mask(pool.to(self.device), layer.mlp.spec, width)
        return rows
