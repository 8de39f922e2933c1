"""Documents -> token chunks -> packed rows with document boundaries kept (no cross-document mixing)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from server.tools.demo.corpus import DOMAINS, Document


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, T] int64
    segments: torch.Tensor  # [B, T] row-local document id; padding is its own segment
    valid: torch.Tensor  # [B, T] bool, False on padding
    labels: torch.Tensor  # [B, T] next token of the same document, -100 elsewhere

    @property
    def num_tokens(self) -> int:
        return int(self.valid.sum())


def tokenize(documents: Sequence[Document], tokenizer: Tokenizer, eos_id: int) -> list[tuple[list[int], int]]:
    """(token ids ending with EOS, domain index) per document."""
    encodings = tokenizer.encode_batch([d.text for d in documents])
    return [(e.ids + [eos_id], DOMAINS.index(d.domain)) for e, d in zip(encodings, documents, strict=True)]


def split_chunks(
    tokenized: Sequence[tuple[list[int], int]], seq_len: int, min_len: int = 8
) -> list[list[int]]:
    """Documents longer than a row become consecutive pieces; each piece is a document of its own
    for attention and pools (EMO's one-document-per-sequence crop)."""
    chunks = []
    for ids, _ in tokenized:
        for start in range(0, len(ids), seq_len):
            piece = ids[start : start + seq_len]
            if len(piece) >= min_len:
                chunks.append(piece)
    return chunks


def labels_for(input_ids: torch.Tensor, segments: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    labels = torch.full_like(input_ids, -100)
    same_doc = (segments[:, 1:] == segments[:, :-1]) & valid[:, 1:]
    labels[:, :-1] = torch.where(same_doc, input_ids[:, 1:], labels[:, :-1])
    return labels


def pack_rows(chunks: Sequence[list[int]], seq_len: int, pad_id: int) -> Batch:
    """Greedy packing in the given order: a chunk that does not fit closes the row."""
    rows: list[list[int]] = []
    segs: list[list[int]] = []
    row: list[int] = []
    seg: list[int] = []
    for chunk in chunks:
        if len(row) + len(chunk) > seq_len:
            rows.append(row)
            segs.append(seg)
            row, seg = [], []
        seg += [seg[-1] + 1 if seg else 0] * len(chunk)
        row += chunk
    if row:
        rows.append(row)
        segs.append(seg)
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    segments = torch.zeros((len(rows), seq_len), dtype=torch.long)
    valid = torch.zeros((len(rows), seq_len), dtype=torch.bool)
    for i, (r, s) in enumerate(zip(rows, segs, strict=True)):
        input_ids[i, : len(r)] = torch.tensor(r)
        segments[i, : len(s)] = torch.tensor(s)
        segments[i, len(s) :] = s[-1] + 1
        valid[i, : len(r)] = True
    return Batch(input_ids, segments, valid, labels_for(input_ids, segments, valid))


def batches(
    chunks: Sequence[list[int]], batch_size: int, seq_len: int, pad_id: int, seed: int
) -> Iterator[Batch]:
    """Endless batches: every epoch reshuffles the chunks (seeded) and packs them again."""
    rng = random.Random(seed)
    order = list(range(len(chunks)))
    while True:
        rng.shuffle(order)
        packed = pack_rows([chunks[i] for i in order], seq_len, pad_id)
        for start in range(0, packed.input_ids.shape[0] - batch_size + 1, batch_size):
            window = slice(start, start + batch_size)
            yield Batch(
                packed.input_ids[window], packed.segments[window], packed.valid[window], packed.labels[window]
            )
