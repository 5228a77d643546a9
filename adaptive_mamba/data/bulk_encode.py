"""Encode many documents fast, with exactly the ids `Tokenizer.encode` gives each document whole.

Each text is cut where its tokenizer provably does not merge across (`Tokenizer.cut_pattern`: before the
whitespace that starts a word, so pieces are about one word each), each distinct piece is encoded once (the
4.2 MB KJV is 0.8 M pieces but only about 30 k distinct ones) and the pieces' ids are gathered back in order
with numpy. The library encodes one chunk's new pieces in a background thread (it releases the GIL and
batches over its own threads) while this thread cuts and deduplicates the next chunk, so both cores work.
A tokenizer without a proven cut (`cut_pattern` None) gets whole documents, which are still deduplicated,
batched and overlapped the same way.

    ids, lengths = BulkEncoder(tok).encode(texts)   # int64 ids of all texts concatenated, ids per text
"""
from __future__ import annotations

import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np

from adaptive_mamba.tokenizer import Tokenizer

CHUNK_CHARS = 1 << 20  # text cut and deduplicated per step: bounds the piece lists held in memory
MAX_PIECES = 1 << 20  # distinct pieces remembered (with their ids) before the cache starts over


class BulkEncoder:
    """Encodes texts through a cache of distinct pieces; keep one per process to reuse it across calls."""

    def __init__(self, tokenizer: Tokenizer, chunk_chars: int = CHUNK_CHARS, max_pieces: int = MAX_PIECES) -> None:
        if chunk_chars < 1 or max_pieces < 1:
            raise ValueError(f"chunk_chars and max_pieces must be >= 1, got {chunk_chars} and {max_pieces}")
        self.tokenizer = tokenizer
        self._cut = tokenizer.cut_pattern
        self._chunk_chars = chunk_chars
        self._max_pieces = max_pieces
        self._forget()

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, lengths): every text's ids, concatenated in order (int64), and the number of ids of each text."""
        lengths = np.zeros(len(texts), dtype=np.int64)
        parts = []
        for ids, seg_doc, seg_len in self.iter_encode(texts):
            parts.append(ids)
            np.add.at(lengths, seg_doc, seg_len)
        return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)), lengths

    def iter_encode(self, texts: Sequence[str]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per chunk of about `chunk_chars` of text, in order: (ids, the text index of each consecutive
        segment, the number of ids of each segment). A long text spans several chunks, a chunk several texts."""
        with ThreadPoolExecutor(1) as pool:
            pending = None
            for pieces, seg_doc, seg_pieces in self._chunks(texts):
                if len(self._index) > self._max_pieces:
                    if pending is not None:
                        yield self._finish(*pending)
                        pending = None
                    self._forget()
                known = len(self._index)
                slots = np.fromiter([self._index.setdefault(p, len(self._index)) for p in pieces],
                                    dtype=np.int64, count=len(pieces))
                job = pool.submit(self._encode_pieces, list(itertools.islice(self._index, known, None)))
                if pending is not None:
                    yield self._finish(*pending)
                pending = (job, slots, seg_doc, seg_pieces)
            if pending is not None:
                yield self._finish(*pending)

    def _forget(self) -> None:
        """Start the piece cache over: piece -> slot, and each slot's ids as a slice of one flat array. The
        arrays have spare capacity (`_n_ids` ids and `_n_slots` slots are used) so that appending a chunk's
        new pieces copies the cache only when it doubles."""
        self._index: dict[str, int] = {}
        self._flat = np.zeros(0, dtype=np.int64)
        self._start = np.zeros(0, dtype=np.int64)
        self._len = np.zeros(0, dtype=np.int64)
        self._n_ids = self._n_slots = 0

    def _chunks(self, texts: Sequence[str]) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
        """(pieces, text index of each segment, pieces per segment) for about `chunk_chars` of text at a time."""
        pieces: list[str] = []
        seg_doc: list[int] = []
        seg_pieces: list[int] = []
        size = 0
        for d, text in enumerate(texts):
            for segment in self._segments(text):
                cut = self._cut.split(segment) if self._cut is not None else [segment]
                pieces += cut
                seg_doc.append(d)
                seg_pieces.append(len(cut))
                size += len(segment)
                if size >= self._chunk_chars:
                    yield pieces, np.array(seg_doc, dtype=np.int64), np.array(seg_pieces, dtype=np.int64)
                    pieces, seg_doc, seg_pieces, size = [], [], [], 0
        if seg_doc:
            yield pieces, np.array(seg_doc, dtype=np.int64), np.array(seg_pieces, dtype=np.int64)

    def _segments(self, text: str) -> Iterator[str]:
        """`text` in consecutive parts of at least `chunk_chars` (the last one shorter), cut at safe places."""
        start = 0
        while self._cut is not None and len(text) - start > self._chunk_chars:
            # search() with a start position still sees the characters before it (the look-behind).
            found = self._cut.search(text, start + self._chunk_chars)
            if found is None:
                break
            yield text[start:found.start()]
            start = found.start()
        yield text[start:]

    def _encode_pieces(self, pieces: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids of all `pieces` concatenated, ids per piece); runs in the background thread."""
        ids = self.tokenizer.encode_batch(pieces) if pieces else []
        lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lens.sum())), lens

    def _finish(self, job: Future, slots: np.ndarray, seg_doc: np.ndarray,
                seg_pieces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Add the chunk's new pieces to the cache, then gather its ids piece by piece."""
        flat, lens = job.result()
        self._start = _append(self._start, self._n_slots, self._n_ids + np.cumsum(lens) - lens)
        self._len = _append(self._len, self._n_slots, lens)
        self._flat = _append(self._flat, self._n_ids, flat)
        self._n_slots += len(lens)
        self._n_ids += len(flat)
        n = self._len[slots]
        ends = np.cumsum(n)
        # output position j of piece p (whose ids start at ends[p] - n[p]) reads _flat[_start[slot] + offset]
        src = np.repeat(self._start[slots] - (ends - n), n) + np.arange(int(ends[-1]))
        seg_len = np.add.reduceat(n, np.cumsum(seg_pieces) - seg_pieces)
        return self._flat[src], seg_doc, seg_len


def _append(buffer: np.ndarray, used: int, values: np.ndarray) -> np.ndarray:
    """`buffer` with `values` written after its first `used` entries; reallocated (at least doubled) only when
    full, so appending chunk after chunk costs time linear in the total instead of quadratic."""
    end = used + len(values)
    if end > len(buffer):
        grown = np.empty(max(end, 2 * len(buffer)), dtype=buffer.dtype)
        grown[:used] = buffer[:used]
        buffer = grown
    buffer[used:end] = values
    return buffer
