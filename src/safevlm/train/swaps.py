"""Decision swaps: stage-2 records that teach the language model to answer as the head decides.

With ``prefix_conditioning="decision"`` the prefix tokens carry the safety head's decision (its
risk-level and risk-type probabilities; :meth:`safevlm.model.SafeVLM.prefix_state`). In plain
stage-2 data that decision always agrees with the prompt: a risky request comes with a risky
decision and a refusal, a benign one with a safe decision and an answer. The language model can
then learn to refuse by the prompt's wording as well as by the decision, and a wording it never
saw (a new template, a new way to ask) gets the answer the wording suggests, whatever the head
decided. On the demo's held-out split the head flagged nearly every risky request while the
model still answered many of them.

A decision swap breaks that agreement: a safe record (its image and prompt) with a risky
record's decision in the prefix and that record's answer as the target. The head still learns
the safe record's own labels (the swap changes what the prefix carries, not what the head is
taught), so the only thing that tells the model to refuse a swap is the decision: the model
learns to follow it.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from safevlm.data.collator import PREFIX_DECISION_KEY
from safevlm.data.records import SafetyRecord, Turn


def _ends_with_answer(record: SafetyRecord) -> bool:
    return bool(record.turns) and record.turns[-1].role == "assistant" and bool(record.turns[-1].text.strip())


def decision_swaps(records: Sequence[SafetyRecord], ratio: float, seed: int = 0) -> list[SafetyRecord]:
    """Decision swaps for a share ``ratio`` of the safe records of ``records``.

    Each safe record (``risk_level`` 0) that ends with an answer is picked with probability
    ``ratio``; its swap keeps its image, prompt, earlier turns and risk labels, takes a random
    risky record's last answer in place of its own, and carries that record's decision
    (``metadata["prefix_decision"] = [risk_level, risk_type]``, what the collators hand the model
    as ``condition_level`` / ``condition_type``). The swap's id is the record's with ``#swap``.
    The same records, ratio and seed give the same swaps.

    Raises ``ValueError`` for a ratio outside [0, 1], or when swaps are asked for but the records
    hold no safe record with an answer or no risky record with an answer to take.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"decision swap ratio must be in [0, 1], got {ratio}")
    if ratio == 0:
        return []
    safe = [r for r in records if r.risk_level == 0 and _ends_with_answer(r)]
    donors = [r for r in records if r.risk_level > 0 and _ends_with_answer(r)]
    if not safe or not donors:
        raise ValueError(
            f"decision swaps need safe and risky training records that end with an answer; got {len(safe)} safe "
            f"and {len(donors)} risky of {len(records)} records"
        )
    rng = random.Random(f"decision-swaps-{seed}")
    swaps = []
    for record in safe:
        if rng.random() >= ratio:
            continue
        donor = rng.choice(donors)
        turns = [*record.turns[:-1], Turn("assistant", donor.turns[-1].text)]
        metadata = {**record.metadata, PREFIX_DECISION_KEY: [donor.risk_level, donor.risk_type],
                    "swap_of": record.id, "answer_of": donor.id}
        swaps.append(dataclasses.replace(record, id=f"{record.id}#swap", turns=turns, metadata=metadata))
    return swaps


__all__ = ["decision_swaps"]
