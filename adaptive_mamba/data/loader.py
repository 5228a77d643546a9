"""Long-sequence windows over token shards: deterministic, resumable, disjoint across ranks.

An epoch is laid out from (seed, epoch) alone:
  1. documents are shuffled (or kept in order with shuffle=False);
  2. ``mode="pack"``: documents are concatenated with an EOS after each one and the stream is cut
     into windows of `seq_len` (the last one padded);
     ``mode="pad"``: each document plus its EOS is cut into windows of `seq_len` on its own, the
     last window of each document padded, so no window mixes documents;
     ``mode="document"``: windows as in "pad", but unpadded: a document of up to `seq_len` tokens is
     one sequence of its own length (whole books as single sequences); rows of a batch are padded
     to the longest row;
  3. the windows are shuffled, and step `k` gives rank `r` the windows
     ``order[k * G + i * world_size + r]`` for i < batch_size, with G = world_size * batch_size.

So every token of the split (and each document's EOS) is in exactly one window per epoch, ranks
never share a window, and `batch_at(step)` needs no history: resuming at step k yields exactly the
batch an uninterrupted run would. The last step of an epoch may hold padding-only rows
(labels all -100) when the windows do not fill it; ``drop_last=True`` drops that step instead.
Windows are read from memory-mapped shards, so 64k+-token windows never load a whole shard.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from adaptive_mamba.data.shards import PACKING_MODES, TokenShards

IGNORE_INDEX = -100


@dataclass
class _EpochLayout:
    epoch: int
    doc_order: np.ndarray      # documents in stream order
    cum: np.ndarray            # pack: stream offsets of docs; pad: first window of each doc
    window_order: np.ndarray   # window ids in visiting order
    n_windows: int


class WindowSampler:
    """Yields this rank's batches `{"input_ids", "labels"}` of shape (batch_size, seq_len)."""

    def __init__(self, shards: TokenShards, seq_len: int, batch_size: int = 1, rank: int = 0,
                 world_size: int = 1, seed: int = 0, mode: str = "pack", shuffle: bool = True,
                 drop_last: bool = False) -> None:
        if mode not in PACKING_MODES:
            raise ValueError(f"mode must be one of {list(PACKING_MODES)}, got {mode!r}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1 (got {seq_len}, {batch_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if len(shards) == 0:
            raise ValueError(f"split {shards.split!r} of {shards.path} has no documents")
        self.shards = shards
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.mode, self.shuffle, self.drop_last = seed, mode, shuffle, drop_last
        self.eos_id = shards.eos_id
        self.pad_id = shards.pad_id if shards.pad_id is not None else shards.eos_id
        self.epoch, self.step = 0, 0
        self._layout: _EpochLayout | None = None

    def _rng(self, epoch: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, stream])

    def layout(self, epoch: int) -> _EpochLayout:
        """The epoch's document order and window order (cached for the current epoch)."""
        if self._layout is not None and self._layout.epoch == epoch:
            return self._layout
        n_docs = len(self.shards)
        doc_order = self._rng(epoch, 0).permutation(n_docs) if self.shuffle else np.arange(n_docs)
        sizes = self.shards.doc_lengths[doc_order] + 1  # + EOS
        if self.mode == "pack":
            cum = np.concatenate([[0], np.cumsum(sizes)])
            n_windows = int(-(-int(cum[-1]) // self.seq_len))
        else:
            cum = np.concatenate([[0], np.cumsum(-(-sizes // self.seq_len))])
            n_windows = int(cum[-1])
        window_order = (self._rng(epoch, 1).permutation(n_windows) if self.shuffle
                        else np.arange(n_windows))
        self._layout = _EpochLayout(epoch, doc_order, cum, window_order, n_windows)
        return self._layout

    def steps_per_epoch(self, epoch: int | None = None) -> int:
        n = self.layout(self.epoch if epoch is None else epoch).n_windows
        per_step = self.world_size * self.batch_size
        return n // per_step if self.drop_last else -(-n // per_step)

    def _doc_piece(self, doc: int, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of document `doc` followed by its EOS (position len(doc))."""
        n = int(self.shards.doc_lengths[doc])
        piece = self.shards.doc(doc, start, min(stop, n)).astype(np.int64)
        if stop > n:
            piece = np.concatenate([piece, [self.eos_id]])
        return piece

    def window(self, window_id: int, epoch: int) -> np.ndarray:
        """Token ids of one window (length <= seq_len; shorter only at the end of the data)."""
        lay = self.layout(epoch)
        L = self.seq_len
        if self.mode != "pack":
            d = int(np.searchsorted(lay.cum, window_id, side="right") - 1)
            j = window_id - int(lay.cum[d])
            return self._doc_piece(int(lay.doc_order[d]), j * L, (j + 1) * L)
        start, stop = window_id * L, min((window_id + 1) * L, int(lay.cum[-1]))
        d = int(np.searchsorted(lay.cum, start, side="right") - 1)
        pieces = []
        while start < stop:
            doc_start, doc_end = int(lay.cum[d]), int(lay.cum[d + 1])
            end = min(stop, doc_end)
            pieces.append(self._doc_piece(int(lay.doc_order[d]), start - doc_start, end - doc_start))
            start, d = end, d + 1
        return np.concatenate(pieces)

    def window_ids_at(self, step: int, epoch: int | None = None) -> list[int | None]:
        """The window ids of this rank's rows at `step` (None for a padding-only row)."""
        epoch = self.epoch if epoch is None else epoch
        lay = self.layout(epoch)
        if not 0 <= step < self.steps_per_epoch(epoch):
            raise IndexError(f"step {step} outside epoch {epoch} ({self.steps_per_epoch(epoch)} steps)")
        base = step * self.world_size * self.batch_size
        ids: list[int | None] = []
        for i in range(self.batch_size):
            g = base + i * self.world_size + self.rank
            ids.append(int(lay.window_order[g]) if g < lay.n_windows else None)
        return ids

    def batch_at(self, step: int, epoch: int | None = None) -> dict[str, torch.Tensor]:
        """This rank's batch at `step` of `epoch`; a pure function of (seed, epoch, step, rank)."""
        epoch = self.epoch if epoch is None else epoch
        rows = [None if w is None else self.window(w, epoch) for w in self.window_ids_at(step, epoch)]
        width = self.seq_len if self.mode != "document" else max((len(t) for t in rows if t is not None), default=2)
        input_ids = np.full((self.batch_size, width), self.pad_id, dtype=np.int64)
        labels = np.full((self.batch_size, width), IGNORE_INDEX, dtype=np.int64)
        for row, tokens in enumerate(rows):
            if tokens is None:
                continue
            input_ids[row, :len(tokens)] = tokens
            labels[row, :len(tokens)] = tokens
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.step = epoch, 0

    def __len__(self) -> int:
        return self.steps_per_epoch()

    def __iter__(self):
        """Batches from the current (epoch, step) to the end of the epoch; advances the state."""
        while self.step < self.steps_per_epoch():
            batch = self.batch_at(self.step)
            self.step += 1
            yield batch

    def state_dict(self) -> dict:
        """Where to resume: the next step to yield, plus the settings that define the layout."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed,
                "seq_len": self.seq_len, "batch_size": self.batch_size,
                "world_size": self.world_size, "mode": self.mode, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", "batch_size", "world_size", "mode", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: checkpoint has {key}={state[key]!r}, this "
                                 f"sampler has {getattr(self, key)!r}; resume needs the same value")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
