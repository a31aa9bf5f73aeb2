"""Balanced sampling across risk types with a configurable clean:risky ratio.

Each epoch draws ``num_samples`` indices: ``clean_ratio / (1 + clean_ratio)`` of them clean
(the taxonomy's safe type) and the rest risky, split equally across the risky types present
(remainders go to the first types in a per-epoch shuffled order). Within a class, records
are taken from successive random permutations, so every record is used before any repeats.
The order depends only on ``(seed, epoch)``: all ranks of a distributed run draw the same
sequence (accelerate shards it) and a resumed run redraws exactly the interrupted epoch.

With ``lengths`` and ``batch_size`` the drawn order is grouped by length (:func:`group_by_length`):
each batch holds records of similar token length, so less of it is padding; which records an
epoch draws does not change, only how they are batched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Sampler


class BalancedRiskSampler(Sampler[int]):
    """Sampler over record indices.

    Args:
        risk_types: the risk type id of every record.
        safe_type_id: the type id that means "no risk".
        clean_ratio: clean samples per risky sample (None: the data's own ratio).
        balance_types: share the risky samples equally across risky types (else draw risky
            records uniformly).
        num_samples: indices per epoch (default: the number of records).
        seed: base seed; the epoch is added via :meth:`set_epoch`.
        lengths: token length of every record (with ``batch_size``: group batches by length).
        batch_size: the per-device batch size the indices are cut into.
        length_window: batches sorted by length together (:func:`group_by_length`'s ``mega_batches``).
    """

    def __init__(
        self,
        risk_types: Sequence[int],
        safe_type_id: int,
        clean_ratio: float | None = None,
        balance_types: bool = True,
        num_samples: int | None = None,
        seed: int = 0,
        lengths: Sequence[int] | None = None,
        batch_size: int | None = None,
        length_window: int = 50,
    ):
        self.risk_types = [int(t) for t in risk_types]
        if not self.risk_types:
            raise ValueError("no records to sample from")
        if (lengths is None) != (batch_size is None):
            raise ValueError("lengths and batch_size go together (both to group by length, neither to shuffle)")
        if lengths is not None and len(lengths) != len(self.risk_types):
            raise ValueError(f"{len(lengths)} lengths for {len(self.risk_types)} records")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = None if lengths is None else [int(n) for n in lengths]
        self.batch_size = batch_size
        if length_window < 1:
            raise ValueError(f"length_window must be >= 1, got {length_window}")
        self.length_window = length_window
        self.safe_type_id = safe_type_id
        self.balance_types = balance_types
        self.seed = seed
        self.epoch = 0
        self.num_samples = len(self.risk_types) if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        self.clean = [i for i, t in enumerate(self.risk_types) if t == safe_type_id]
        by_type: dict[int, list[int]] = {}
        for i, t in enumerate(self.risk_types):
            if t != safe_type_id:
                by_type.setdefault(t, []).append(i)
        self.risky_by_type = dict(sorted(by_type.items()))
        n_risky = len(self.risk_types) - len(self.clean)
        if clean_ratio is None:
            clean_ratio = len(self.clean) / n_risky if n_risky else float("inf")
        if clean_ratio < 0:
            raise ValueError(f"clean_ratio must be >= 0, got {clean_ratio}")
        if clean_ratio > 0 and not self.clean:
            raise ValueError(f"clean_ratio is {clean_ratio:g} but the data has no clean (safe) records")
        if clean_ratio != float("inf") and n_risky == 0:
            raise ValueError("the data has no risky records; set clean_ratio to null")
        self.clean_ratio = clean_ratio

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def quotas(self) -> tuple[int, dict[int, int]]:
        """(clean samples, risky samples per type) per epoch, before the per-epoch remainder shuffle."""
        n = self.num_samples
        n_clean = n if self.clean_ratio == float("inf") else round(n * self.clean_ratio / (1 + self.clean_ratio))
        n_risky = n - n_clean
        types = list(self.risky_by_type)
        if not types:
            return n_clean, {}
        if self.balance_types:
            base, extra = divmod(n_risky, len(types))
            return n_clean, {t: base + (1 if i < extra else 0) for i, t in enumerate(types)}
        return n_clean, {-1: n_risky}  # -1: all risky records in one pool

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n_clean, quotas = self.quotas()
        types = list(quotas)
        if self.balance_types and len(types) > 1:
            # which types get the remainder changes from epoch to epoch
            order = torch.randperm(len(types), generator=g).tolist()
            counts = sorted(quotas.values(), reverse=True)
            quotas = {types[j]: counts[k] for k, j in enumerate(order)}
        chosen = _draw(self.clean, n_clean, g)
        for t, q in quotas.items():
            pool = [i for ids in self.risky_by_type.values() for i in ids] if t == -1 else self.risky_by_type[t]
            chosen.extend(_draw(pool, q, g))
        perm = torch.randperm(len(chosen), generator=g).tolist()
        order = [chosen[i] for i in perm]
        if self.lengths is not None:
            order = group_by_length(order, self.lengths, self.batch_size, g, self.length_window)
        return iter(order)


def group_by_length(order: list[int], lengths: Sequence[int], batch_size: int, generator: torch.Generator,
                    mega_batches: int = 50) -> list[int]:
    """``order`` regrouped so that each run of ``batch_size`` indices has similar lengths.

    The shuffled order is cut into mega-batches of ``mega_batches * batch_size`` indices; each
    is sorted by ``lengths[i]`` (longest first) and cut into batches; then the batches are
    shuffled, except that the longest batch of all goes first (memory errors show at step 1).
    The same indices come out, each once; only the batching changes (as Hugging Face's
    ``group_by_length``). A last partial batch stays last.
    """
    size = mega_batches * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), size):
        mega = sorted(order[start:start + size], key=lambda i: -lengths[i])
        batches += [mega[k:k + batch_size] for k in range(0, len(mega), batch_size)]
    tail = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    if not batches:
        return [i for b in tail for i in b]
    longest = max(range(len(batches)), key=lambda k: max(lengths[i] for i in batches[k]))
    batches[0], batches[longest] = batches[longest], batches[0]
    rest = torch.randperm(len(batches) - 1, generator=generator).tolist()
    batches = [batches[0]] + [batches[1 + k] for k in rest] + tail
    return [i for b in batches for i in b]


def _draw(pool: list[int], k: int, g: torch.Generator) -> list[int]:
    """``k`` items from ``pool`` through successive random permutations (no repeat before all are used)."""
    out: list[int] = []
    if k <= 0 or not pool:
        return out
    while len(out) < k:
        perm = torch.randperm(len(pool), generator=g).tolist()
        out.extend(pool[i] for i in perm[: k - len(out)])
    return out


__all__ = ["BalancedRiskSampler", "group_by_length"]
