"""The decoder shared by every family: prefill (one prompt into a KV slot) and batched decode."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from expert_cache.base import ExpertKey, ExpertStore
from server.model.attention import Attention, decode_mask
from server.model.config import ModelConfig
from server.model.decode_graphs import GraphedDecode
from server.model.decode_step import DecodeStep, attend_bucket
from server.model.kv_cache import KVCache
from server.model.layers import RMSNorm, SwiGLU, as_float, frozen
from server.model.moe import MoEBlock
from server.model.pool import pool_mask, pool_scores, routable_index, select_pool
from server.model.resident import ResidentExpertStore
from server.model.rope import RotaryEmbedding
from server.model.weights import build_layer_modules


@dataclass
class PrefillOutput:
    logits: torch.Tensor  # float32 [T, V] (all_logits) or [1, V]
    pools: list[torch.Tensor | None] | None  # per layer sorted pool ids; None: dense / full routing
    pinned: list[ExpertKey]  # pin_pool=True: pins the caller owns and must release
    pinned_slots: list[int] = field(default_factory=list)  # the slab slot of each pinned key


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
        """``given_pools`` (per layer, e.g. a named pool): used as they are instead of being
        chosen from this prompt; each MoE layer's must hold ``pool_size`` routable ids."""
        T = int(input_ids.shape[0])
        if input_ids.dim() != 1 or T == 0:
            raise ValueError(f"prefill needs a non-empty 1-D input_ids, got shape {tuple(input_ids.shape)}")
        kv.check_positions(T - 1)
        if pool_size is not None:
            self.config.validate_pool_size(pool_size)
        given_ids: list[list[int]] | None = None  # the given pools on the host, for pins and prefetch
        if given_pools is not None:
            if pool_size is None:
                raise ValueError("prefill: given_pools needs pool_size")
            given_pools, given_ids = self._check_pools(given_pools, pool_size)
        positions = torch.arange(T, device=self.device)
        cos, sin = self.rope(positions, torch.full_like(positions, T), self.dtype)
        x = F.embedding(input_ids.to(self.device), self.embed)  # [T, H]
        pools: list[torch.Tensor | None] | None = None if pool_size is None else []
        pinned: list[ExpertKey] = []
        pinned_slots: list[int] = []
        try:
            for index, layer in enumerate(self.decoder_layers):
                h = x + layer.attn.prefill(layer.attn_norm(x), cos, sin, kv, slot)
                normed = layer.mlp_norm(h)
                mlp = layer.mlp
                if not isinstance(mlp, MoEBlock):
                    x = h + mlp(normed)
                    if pools is not None:
                        pools.append(None)
                    continue
                logits = mlp.router_logits(normed)  # [T, E]
                allowed = None
                if pools is not None and pool_size is not None:
                    given = None if given_pools is None else given_pools[index]
                    pool = (select_pool(pool_scores(logits, mlp.spec), mlp.spec, pool_size)
                            if given is None else given)
                    pools.append(pool)
                    if pin_pool:
                        ids = pool.tolist() if given_ids is None else given_ids[index]
                        keys = [(index, e) for e in ids]
                        pinned_slots.extend(self.expert_store.acquire_slots(keys))
                        pinned.extend(keys)
                    allowed = pool_mask(pool, mlp.spec, mlp.spec.num_experts)[None, :]
                    self._prefetch_next(index, h, pool_size, given_ids)
                x = h + mlp(normed, logits, allowed)
            logits_out = self.logits(x if all_logits else x[-1:])
        except BaseException:
            if pinned:
                self.expert_store.release(pinned)
            raise
        return PrefillOutput(logits_out, pools, pinned, pinned_slots)

    def _prefetch_next(self, index: int, h: torch.Tensor, pool_size: int,
                       given_ids: list[list[int]] | None = None) -> None:
        """Hint the store with the next MoE layer's pool: the given one when there is one, else
        its router on this layer's hidden states (the true pool needs this layer's output,
        which is not computed yet)."""
        for nxt in range(index + 1, len(self.decoder_layers)):
            layer = self.decoder_layers[nxt]
            if isinstance(layer.mlp, MoEBlock):
                if given_ids is not None:
                    ids = given_ids[nxt]
                else:
                    logits = layer.mlp.router_logits(layer.mlp_norm(h))
                    ids = select_pool(pool_scores(logits, layer.mlp.spec), layer.mlp.spec, pool_size).tolist()
                self.expert_store.prefetch([(nxt, e) for e in ids])
                return

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
