"""Policy hints in stage-2 training: the language model learns to read the hints a policy inserts.

At inference a policy's ``hint`` action inserts a safety hint into the chat (a system message
or the end of the user turn; :func:`safevlm.data.chat.insert_hint`) after the head has decided.
A large model understands such a hint; a language model fine-tuned only on conversations
without hints has never seen one, and an unseen system message moves it off the data it was
trained on. In one of the demo's runs, the held-out risky requests the default policy hinted
(the head's decision, carried by the prefix tokens, was risky for all of them) were refused
30 of 30 times without the hint and 21 of 30 times with it: the hint made the model less safe.

A share of the stage-2 records therefore reads a hint in training, the way the policy would
insert it: a risky record gets the policy's hint for its own risk type and level, a safe record
a hint for a random risky type and level (a policy hints at any likely risk, so benign
requests near the threshold get hints too). The answers stay the records' own, so the hint
is not what decides between refusing and answering (the head's decision is): the model learns
to keep following the decision when a hint is there. The head never reads the hint, as at
inference (the collator aligns its tokens with the unhinted conversation).

Whether it helps depends on the model: on the tiny demo model it helped hinted requests on one
base and cost decision-following without hints on another (docs/training.md), so the demo
leaves it off.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from safevlm.data.collator import POLICY_HINT_KEY
from safevlm.data.records import SafetyRecord


def policy_hints(records: Sequence[SafetyRecord], ratio: float, policy, seed: int = 0) -> list[SafetyRecord]:
    """``records`` with a policy hint on a share ``ratio`` of them (the others unchanged, same order).

    Each record is picked with probability ``ratio``; a picked record gets
    ``metadata["policy_hint"] = {"text", "position", "risk_type", "level"}``: ``policy``'s hint
    text (:meth:`safevlm.policy.Policy.hint_text`) for the record's risk type and level when it
    is risky, for a random risky type and level when it is safe, and the policy's
    ``hint_position``. ``policy``: a :class:`~safevlm.policy.Policy`, a shipped policy name or a
    YAML path. The same records, ratio, policy and seed give the same hints.

    Raises ``ValueError`` for a ratio outside [0, 1] or a record whose risk type or level the
    policy's taxonomy does not have.
    """
    from safevlm.policy import load_policy

    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"policy hint ratio must be in [0, 1], got {ratio}")
    if ratio == 0:
        return list(records)
    policy = load_policy(policy)
    tax = policy.taxonomy
    risky_types = list(tax.risk_type_names)
    rng = random.Random(f"policy-hints-{seed}")
    out = []
    for record in records:
        if rng.random() >= ratio:
            out.append(record)
            continue
        if record.risk_level > 0:
            if record.risk_level >= tax.num_levels or record.risk_type >= tax.num_types:
                raise ValueError(f"record {record.id!r}: risk level {record.risk_level} / type {record.risk_type} "
                                 f"are not in the policy's taxonomy ({tax.num_levels} levels, {tax.num_types} types)")
            risk_type, level = tax.type_name(record.risk_type), record.risk_level
            if risk_type == tax.safe_type:
                risk_type = rng.choice(risky_types)
        else:
            risk_type, level = rng.choice(risky_types), rng.randrange(1, tax.num_levels)
        hint = {"text": policy.hint_text(risk_type, level), "position": policy.hint_position,
                "risk_type": risk_type, "level": level}
        out.append(dataclasses.replace(record, metadata={**record.metadata, POLICY_HINT_KEY: hint}))
    return out


__all__ = ["policy_hints"]
