"""Per-head metrics (accuracy, macro-F1) and the balanced risk-type sampler."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from safevlm.train.metrics import accuracy, head_metrics, macro_f1
from safevlm.train.sampler import BalancedRiskSampler

SAFE = 6


def test_macro_f1_and_accuracy_by_hand():
    y_true = [0, 0, 1, 1, 2]
    y_pred = [0, 1, 1, 1, 0]
    # class 0: tp 1, fp 1, fn 1 -> 0.5; class 1: tp 2, fp 1 -> 0.8; class 2: tp 0, fn 1 -> 0
    assert macro_f1(y_true, y_pred) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert accuracy(y_true, y_pred) == pytest.approx(3 / 5)
    # a class absent from both true and predicted labels does not count...
    assert macro_f1([0, 1], [0, 1]) == 1.0
    # ...unless the labels are named
    assert macro_f1([0, 1], [0, 1], labels=[0, 1, 2]) == pytest.approx(2 / 3)
    assert macro_f1([], []) == 0.0


def test_head_metrics_reports_both_heads_and_takes_tensors():
    m = head_metrics(torch.tensor([0, 3, 3, 1]), torch.tensor([0, 3, 1, 1]), np.array([6, 1, 1, 0]), [6, 1, 1, 1])
    assert set(m) == {"level_accuracy", "level_macro_f1", "type_accuracy", "type_macro_f1"}
    assert m["level_accuracy"] == pytest.approx(0.75) and m["type_accuracy"] == pytest.approx(0.75)
    # types: class 6 f1 1, class 1 tp 2 fp 1 -> 0.8, class 0 -> 0
    assert m["type_macro_f1"] == pytest.approx((1 + 0.8 + 0) / 3)
    with pytest.raises(ValueError, match="got 2 true labels but 3 predictions"):
        head_metrics([0, 1], [0, 1, 2], [0], [0])


def _types(n_per_type: dict[int, int]) -> list[int]:
    return [t for t, n in n_per_type.items() for _ in range(n)]


def test_sampler_balances_risky_types_and_keeps_the_clean_ratio():
    # very unbalanced data: 300 of type 1, 10 of type 0, 20 of type 4, 70 safe
    types = _types({1: 300, 0: 10, 4: 20, SAFE: 70})
    sampler = BalancedRiskSampler(types, SAFE, clean_ratio=0.25, num_samples=500, seed=0)
    drawn = Counter(types[i] for i in sampler)
    assert sum(drawn.values()) == 500 == len(sampler)
    assert drawn[SAFE] == 100  # 0.25 clean per risky: 100 clean, 400 risky
    risky = [drawn[t] for t in (0, 1, 4)]
    assert max(risky) - min(risky) <= 1 and sum(risky) == 400


def test_sampler_uses_every_record_before_repeating_one():
    types = _types({0: 7, 1: 50, SAFE: 13})
    sampler = BalancedRiskSampler(types, SAFE, clean_ratio=None, num_samples=70, seed=3)
    picks = list(sampler)
    # clean share follows the data (13 clean per 57 risky); type 0 needs 28 draws from 7 records: 4 each
    per_record = Counter(picks)
    zeros = [per_record[i] for i, t in enumerate(types) if t == 0]
    assert sorted(set(zeros)) in ([4], [3, 4], [4, 5])
    assert sum(types[i] == SAFE for i in picks) == round(70 * 13 / 57 / (1 + 13 / 57))


def test_sampler_order_depends_only_on_seed_and_epoch():
    types = _types({0: 30, 2: 30, SAFE: 20})
    a = BalancedRiskSampler(types, SAFE, seed=1)
    b = BalancedRiskSampler(types, SAFE, seed=1)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b) == list(a)  # repeatable, also on a second pass
    b.set_epoch(3)
    assert list(a) != list(b)
    c = BalancedRiskSampler(types, SAFE, seed=2)
    c.set_epoch(2)
    assert list(a) != list(c)


def test_sampler_without_type_balancing_draws_risky_records_uniformly():
    types = _types({0: 90, 1: 10, SAFE: 0})
    sampler = BalancedRiskSampler(types, SAFE, balance_types=False, num_samples=100, seed=0)
    assert Counter(types[i] for i in sampler) == Counter({0: 90, 1: 10})  # one permutation: each record once


def test_sampler_refuses_impossible_ratios():
    with pytest.raises(ValueError, match="no clean"):
        BalancedRiskSampler(_types({0: 5}), SAFE, clean_ratio=0.5)
    with pytest.raises(ValueError, match="no risky records"):
        BalancedRiskSampler(_types({SAFE: 5}), SAFE, clean_ratio=0.5)
    with pytest.raises(ValueError, match="no records"):
        BalancedRiskSampler([], SAFE)


def test_grouping_by_length_keeps_the_draw_and_cuts_padding():
    types = _types({0: 100, 1: 100, SAFE: 200})
    lengths = [int(n) for n in np.random.default_rng(0).integers(20, 200, size=len(types))]
    plain = BalancedRiskSampler(types, SAFE, clean_ratio=1.0, num_samples=390, seed=5)
    grouped = BalancedRiskSampler(types, SAFE, clean_ratio=1.0, num_samples=390, seed=5, lengths=lengths, batch_size=16)
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        grouped.set_epoch(epoch)
        a, b = list(plain), list(grouped)
        assert Counter(a) == Counter(b) and len(b) == 390  # the same records drawn, only batched differently

        def padded(order):  # tokens in batches of 16, each padded to its longest record
            return sum(16 * max(lengths[i] for i in order[k:k + 16]) for k in range(0, len(order), 16))

        real = sum(lengths[i] for i in a)
        assert padded(b) - real < 0.25 * (padded(a) - real)  # far less padding than a plain shuffle
        first = b[:16]  # the longest batch goes first (memory errors show at step 1)
        assert max(lengths[i] for i in first) == max(lengths[i] for i in b)
    assert list(grouped) == list(grouped)  # deterministic for (seed, epoch)
    with pytest.raises(ValueError, match="lengths and batch_size go together"):
        BalancedRiskSampler(types, SAFE, lengths=lengths)
    with pytest.raises(ValueError, match="3 lengths for 400 records"):
        BalancedRiskSampler(types, SAFE, lengths=[1, 2, 3], batch_size=4)


def test_group_by_length_keeps_a_partial_batch_last():
    from safevlm.train.sampler import group_by_length

    lengths = list(range(10))
    out = group_by_length(list(range(10)), lengths, 4, torch.Generator().manual_seed(0), mega_batches=1)
    assert sorted(out) == list(range(10))
    # mega-batches of 4 sorted longest first: [3, 2, 1, 0], [7, 6, 5, 4], [9, 8]; the longest full one
    # goes first, the partial one stays last
    assert out[:4] == [7, 6, 5, 4] and out[4:8] == [3, 2, 1, 0] and out[8:] == [9, 8]


def test_a_small_length_window_sorts_only_within_neighbouring_batches():
    from safevlm.train.sampler import BalancedRiskSampler

    rng = torch.Generator().manual_seed(3)
    lengths = torch.randint(20, 120, (96,), generator=rng).tolist()
    types = [SAFE] * 96
    plain = list(BalancedRiskSampler(types, SAFE, balance_types=False, seed=5))
    grouped = list(BalancedRiskSampler(types, SAFE, balance_types=False, seed=5, lengths=lengths, batch_size=8,
                                       length_window=2))
    assert sorted(grouped) == list(range(96))
    windows = [set(plain[k:k + 16]) for k in range(0, 96, 16)]  # the plain draw, two batches at a time
    batches = [grouped[k:k + 8] for k in range(0, 96, 8)]
    assert all(any(set(b) <= w for w in windows) for b in batches)  # no batch mixes records of two windows
    padded = [sum(max(lengths[i] for i in b) for b in (order[k:k + 8] for k in range(0, 96, 8))) for order in (plain, grouped)]
    assert padded[1] < padded[0]
    with pytest.raises(ValueError, match="length_window must be >= 1"):
        BalancedRiskSampler(types, SAFE, lengths=lengths, batch_size=8, length_window=0)
