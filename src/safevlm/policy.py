"""`Policy`: dynamic safety control — the safety head's probabilities -> allow / hint / refuse.

The head gives two distributions per input (softmax of its logits over temperatures T; T = 1 unless ``safevlm calibrate`` fitted them): a risk **level** (0 safe .. 3 serious
risk) and a risk **type**. For every risk type ``t`` other than the safe one, and every level
``k``, the policy reads

    p(t, >=k) = P(level >= k) * P(type = t | type != safe)

"the input carries risk of type t at level k or above": the level head says *how* risky, the
type head says *which kind*. Each type has a :class:`TypeRule`:

* ``enabled: false`` switches the type off (a deployment that allows, e.g., CAPTCHA reading);
* ``refuse`` when ``p(t, >= refuse_level) >= refuse_threshold``;
* else ``hint`` when ``p(t, >= hint_level) >= hint_threshold`` — the hint text is the one for
  the highest level ``k >= hint_level`` with ``p(t, >=k) >= hint_threshold`` (stronger hints
  for higher levels);
* else ``allow``. A threshold of ``null`` never fires.

Over all types the strictest action wins (refuse > hint > allow); among types with that
action, the highest ``p`` decides. A ``default`` rule applies to types not listed, and a
listed type inherits every field it does not set from ``default``.

Fail-closed: probabilities that are NaN, infinite, of the wrong length or not summing to 1
(or a head that raised) give the ``on_error`` action (default ``refuse``), logged as a warning
on the ``safevlm.policy`` logger.

Per-request :class:`PolicyOverrides` (``allow_types: [privacy]``) may only switch off the
types listed in the policy's ``relaxable_types``; anything else raises
:class:`PolicyOverrideError`.

Policies are YAML files; ``safevlm/policies/`` ships ``default``, ``strict`` and
``hint_only``. See ``docs/policy.md``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from safevlm.taxonomy import DEFAULT_TAXONOMY, Taxonomy

logger = logging.getLogger("safevlm.policy")

ACTIONS: tuple[str, ...] = ("allow", "hint", "refuse")
HINT_POSITIONS: tuple[str, ...] = ("system", "user")
DEFAULT_RULE = "default"
POLICIES_DIR = Path(__file__).with_name("policies")
_ACTION_RANK = {a: i for i, a in enumerate(ACTIONS)}
_PROB_SUM_TOLERANCE = 1e-3


class PolicyOverrideError(ValueError):
    """A per-request override asked to relax something the deployment's policy does not permit."""


# -- rules ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TypeRule:
    """What to do for one risk type. Thresholds are on ``p(type, >= level)`` in (0, 1]; None
    never fires. Levels are ids 1..num_levels-1 (0 is 'safe')."""

    enabled: bool = True
    hint_threshold: float | None = 0.5
    hint_level: int = 1
    refuse_threshold: float | None = 0.5
    refuse_level: int = 3

    def validate(self, taxonomy: Taxonomy, where: str) -> None:
        for name in ("hint_threshold", "refuse_threshold"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 < float(value) <= 1.0):
                raise ValueError(f"{where}: {name} must be in (0, 1] or null, got {value!r}")
        for name in ("hint_level", "refuse_level"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < taxonomy.num_levels:
                raise ValueError(f"{where}: {name} must be {_risky_levels(taxonomy)}, got {value!r}")
        if not isinstance(self.enabled, bool):
            raise ValueError(f"{where}: enabled must be true or false, got {self.enabled!r}")


_RULE_FIELDS = {f.name for f in fields(TypeRule)}


def _risky_levels(taxonomy: Taxonomy) -> str:
    """``"a risk level 1..3 (low, medium, high)"``: the levels rules and hints may name (0 is 'safe')."""
    return f"a risk level 1..{taxonomy.num_levels - 1} ({', '.join(taxonomy.level_names[1:])})"


def _parse_rule(raw: Any, base: TypeRule, taxonomy: Taxonomy, where: str) -> TypeRule:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be a mapping of {sorted(_RULE_FIELDS)}, got {raw!r}")
    unknown = set(raw) - _RULE_FIELDS
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_RULE_FIELDS)}")
    values = dict(raw)
    for name in ("hint_level", "refuse_level"):
        if name in values and not isinstance(values[name], bool):
            try:
                values[name] = taxonomy.level_id(values[name])
            except ValueError:  # the same message as validate(): the true range is 1.., not 0..
                raise ValueError(f"{where}: {name} must be {_risky_levels(taxonomy)}, got {values[name]!r}") from None
    for name in ("hint_threshold", "refuse_threshold"):
        if isinstance(values.get(name), int) and not isinstance(values[name], bool):
            values[name] = float(values[name])
    rule = replace(base, **values)
    rule.validate(taxonomy, where)
    return rule


# -- overrides -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicyOverrides:
    """Per-request relaxations. ``allow_types``: risk types switched off for this request; each
    must be in the policy's ``relaxable_types``."""

    allow_types: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.allow_types, str):
            object.__setattr__(self, "allow_types", (self.allow_types,))
        object.__setattr__(self, "allow_types", tuple(dict.fromkeys(self.allow_types)))

    @classmethod
    def from_dict(cls, data: Mapping | None) -> PolicyOverrides | None:
        if not data:
            return None
        unknown = set(data) - {"allow_types"}
        if unknown:
            raise PolicyOverrideError(f"unknown safety override(s) {sorted(unknown)}; allowed: ['allow_types']")
        allow = data.get("allow_types") or ()
        if isinstance(allow, str) or not all(isinstance(x, str) for x in allow):
            raise PolicyOverrideError(f"allow_types must be a list of risk type names, got {allow!r}")
        return cls(allow_types=tuple(allow))

    def to_dict(self) -> dict:
        return {"allow_types": list(self.allow_types)}


# -- decisions -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    """The policy's decision for one input.

    ``risk_level`` / ``risk_type``: the head's most probable level (id) and type (name).
    ``decided_by``: the type whose rule chose ``hint`` or ``refuse`` (None for ``allow``).
    ``score``: that rule's ``p(type, >= level)``. ``hint``: the hint text inserted (or None).
    ``refusal``: the refusal text returned (or None). ``error``: why the fail-closed path ran.
    """

    action: str
    risk_level: int
    risk_type: str
    level_probs: tuple[float, ...]
    type_probs: tuple[tuple[str, float], ...]
    decided_by: str | None = None
    score: float | None = None
    hint_level: int | None = None
    hint: str | None = None
    refusal: str | None = None
    error: str | None = None

    def to_dict(self, ndigits: int = 4) -> dict:
        return {
            "action": self.action,
            "risk_level": self.risk_level,
            "risk_type": self.risk_type,
            "decided_by": self.decided_by,
            "score": None if self.score is None else round(self.score, ndigits),
            "hint_level": self.hint_level,
            "hint": self.hint,
            "refusal": self.refusal,
            "level_probs": [_round(p, ndigits) for p in self.level_probs],
            "type_probs": {name: _round(p, ndigits) for name, p in self.type_probs},
            "error": self.error,
        }


def _round(x: float, ndigits: int):
    return round(x, ndigits) if math.isfinite(x) else None


# -- the policy ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Policy:
    """Maps the safety head's probabilities to ``allow`` / ``hint`` / ``refuse``.

    Build with :meth:`from_yaml`, :meth:`from_dict`, :meth:`default` or :func:`load_policy`;
    ``decide`` for one input, ``decide_batch`` for tensors.
    """

    rules: Mapping[str, TypeRule]
    hints: Mapping[str, Mapping[int, str]]
    refusals: Mapping[str, str]
    hint_position: str = "system"
    on_error: str = "refuse"
    relaxable_types: tuple[str, ...] = ()
    name: str = "custom"
    description: str = ""
    taxonomy: Taxonomy = field(default=DEFAULT_TAXONOMY)

    def __post_init__(self):
        tax = self.taxonomy
        if self.hint_position not in HINT_POSITIONS:
            raise ValueError(f"hint_position must be one of {', '.join(HINT_POSITIONS)}, got {self.hint_position!r}")
        if self.on_error not in ACTIONS:
            raise ValueError(f"on_error must be one of {', '.join(ACTIONS)}, got {self.on_error!r}")
        risky = [t for t in tax.type_names if t != tax.safe_type]
        allowed_keys = [DEFAULT_RULE, *risky]
        for section in ("rules", "hints", "refusals"):
            table = getattr(self, section)
            for key in table:
                if key not in allowed_keys:
                    hint = " (the safe type has no rule)" if key == tax.safe_type else ""
                    raise ValueError(
                        f"{section}: unknown risk type {key!r}{hint}; allowed: {', '.join(allowed_keys)}"
                    )
        if DEFAULT_RULE not in self.rules:
            raise ValueError(f"rules: a {DEFAULT_RULE!r} rule is required")
        for key, rule in self.rules.items():
            rule.validate(tax, f"rules.{key}")
        if DEFAULT_RULE not in self.refusals or not str(self.refusals[DEFAULT_RULE]).strip():
            raise ValueError(f"refusals: a non-empty {DEFAULT_RULE!r} refusal text is required")
        default_hints = self.hints.get(DEFAULT_RULE, {})
        missing = [tax.level_names[k] for k in range(1, tax.num_levels) if not str(default_hints.get(k, "")).strip()]
        if missing:
            raise ValueError(f"hints.{DEFAULT_RULE}: a hint text is required for every risky level; missing {missing}")
        for key, texts in self.hints.items():
            for level in texts:
                if not 1 <= level < tax.num_levels:
                    raise ValueError(f"hints.{key}: level {level} is out of range 1..{tax.num_levels - 1}")
        for t in self.relaxable_types:
            if t not in risky:
                raise ValueError(f"relaxable_types: unknown risk type {t!r}; allowed: {', '.join(risky)}")
        object.__setattr__(self, "relaxable_types", tuple(self.relaxable_types))

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping, source: str = "policy", taxonomy: Taxonomy | None = None) -> Policy:
        """Build and validate a policy from a parsed YAML mapping; errors name ``source``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: a policy must be a YAML mapping, got {type(data).__name__}")
        known = {"version", "name", "description", "extends", "taxonomy", "hint_position", "on_error",
                 "relaxable_types", "rules", "hints", "refusals"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {sorted(unknown)}; allowed: {sorted(known)}")
        if data.get("version", 1) != 1:
            raise ValueError(f"{source}: unsupported policy version {data.get('version')!r}; supported: 1")
        if data.get("extends"):
            data = _merge(_read_parent(data["extends"], source, seen=(source,)), data)
        try:
            if taxonomy is None:
                taxonomy = Taxonomy.from_dict(data["taxonomy"]) if data.get("taxonomy") else DEFAULT_TAXONOMY
            raw_rules = data.get("rules") or {}
            if not isinstance(raw_rules, Mapping):
                raise ValueError(f"rules must be a mapping of risk type -> rule, got {raw_rules!r}")
            default = _parse_rule(raw_rules.get(DEFAULT_RULE), TypeRule(), taxonomy, f"rules.{DEFAULT_RULE}")
            rules = {DEFAULT_RULE: default}
            for key, raw in raw_rules.items():
                if key != DEFAULT_RULE:
                    rules[str(key)] = _parse_rule(raw, default, taxonomy, f"rules.{key}")
            hints = {}
            raw_hints = data.get("hints") or {}
            if not isinstance(raw_hints, Mapping):
                raise ValueError(f"hints must be a mapping of risk type -> {{level: text}}, got {raw_hints!r}")
            for key, texts in raw_hints.items():
                if not isinstance(texts, Mapping):
                    raise ValueError(f"hints.{key} must be a mapping of level -> text, got {texts!r}")
                parsed = {}
                for level, text in texts.items():
                    try:
                        level_id = taxonomy.level_id(level)
                    except ValueError:
                        level_id = 0
                    if level_id == 0:  # level 0 (safe) gets no hint
                        raise ValueError(f"hints.{key}: level {level!r} must be {_risky_levels(taxonomy)}")
                    if not isinstance(text, str) or not text.strip():
                        raise ValueError(f"hints.{key}.{level}: the hint must be non-empty text, got {text!r}")
                    parsed[level_id] = text.strip()
                hints[str(key)] = parsed
            refusals = {}
            raw_refusals = data.get("refusals") or {}
            if not isinstance(raw_refusals, Mapping):
                raise ValueError(f"refusals must be a mapping of risk type -> text, got {raw_refusals!r}")
            for key, text in raw_refusals.items():
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"refusals.{key}: the refusal must be non-empty text, got {text!r}")
                refusals[str(key)] = text.strip()
            relaxable = data.get("relaxable_types") or ()
            if isinstance(relaxable, str):
                raise ValueError(f"relaxable_types must be a list of risk types, got {relaxable!r}")
            return cls(
                rules=rules,
                hints=hints,
                refusals=refusals,
                hint_position=data.get("hint_position", "system"),
                on_error=data.get("on_error", "refuse"),
                relaxable_types=tuple(relaxable),
                name=str(data.get("name", "custom")),
                description=str(data.get("description", "")).strip(),
                taxonomy=taxonomy,
            )
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, taxonomy: Taxonomy | None = None) -> Policy:
        """Load and validate a policy YAML file (``extends: NAME_OR_PATH`` builds on another
        policy; a relative path is read from the file's folder)."""
        path = Path(path)
        data = _read_yaml(path)
        if isinstance(data, Mapping) and data.get("extends"):
            parent = _read_parent(data["extends"], str(path), seen=(str(path.resolve()),), folder=path.parent)
            data = _merge(parent, data)
        return cls.from_dict(data, source=str(path), taxonomy=taxonomy)

    @classmethod
    def default(cls) -> Policy:
        """The shipped ``default`` policy."""
        return load_policy("default")

    def to_dict(self) -> dict:
        """A mapping that :meth:`from_dict` reads back to an equal policy."""
        tax = self.taxonomy
        out = {
            "version": 1,
            "name": self.name,
            "description": self.description,
            "hint_position": self.hint_position,
            "on_error": self.on_error,
            "relaxable_types": list(self.relaxable_types),
            "rules": {k: {f.name: getattr(r, f.name) for f in fields(TypeRule)} for k, r in self.rules.items()},
            "hints": {k: {tax.level_names[lv]: text for lv, text in v.items()} for k, v in self.hints.items()},
            "refusals": dict(self.refusals),
        }
        if tax != DEFAULT_TAXONOMY:
            out["taxonomy"] = tax.to_dict()
        return out

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    # -- lookups ----------------------------------------------------------------------------------
    def rule(self, risk_type: str) -> TypeRule:
        """The rule for ``risk_type`` (the ``default`` rule when it is not listed)."""
        self.taxonomy.type_id(risk_type)
        return self.rules.get(risk_type, self.rules[DEFAULT_RULE])

    def hint_text(self, risk_type: str, level: int) -> str:
        texts = self.hints.get(risk_type, {})
        return texts.get(level) or self.hints[DEFAULT_RULE][level]

    def refusal_text(self, risk_type: str | None) -> str:
        return self.refusals.get(risk_type or DEFAULT_RULE) or self.refusals[DEFAULT_RULE]

    def check_overrides(self, overrides: PolicyOverrides | None) -> frozenset[str]:
        """The types a request switches off; raises :class:`PolicyOverrideError` for types the
        deployment does not let requests relax."""
        if overrides is None or not overrides.allow_types:
            return frozenset()
        risky = [t for t in self.taxonomy.type_names if t != self.taxonomy.safe_type]
        unknown = [t for t in overrides.allow_types if t not in risky]
        if unknown:
            raise PolicyOverrideError(f"allow_types: unknown risk type(s) {unknown}; allowed: {', '.join(risky)}")
        refused = [t for t in overrides.allow_types if t not in self.relaxable_types]
        if refused:
            permitted = ", ".join(self.relaxable_types) or "none"
            raise PolicyOverrideError(
                f"this deployment's policy ({self.name}) does not let requests allow {refused}; relaxable types: {permitted}"
            )
        return frozenset(overrides.allow_types)

    # -- decisions --------------------------------------------------------------------------------
    def decide(
        self,
        level_probs: Sequence[float],
        type_probs: Sequence[float],
        overrides: PolicyOverrides | None = None,
    ) -> Decision:
        """The decision for one input from its level probabilities (num_levels,) and type
        probabilities (num_types,). Invalid probabilities take the fail-closed path."""
        switched_off = self.check_overrides(overrides)
        tax = self.taxonomy
        level_probs = tuple(float(p) for p in level_probs)
        type_probs = tuple(float(p) for p in type_probs)
        problem = _check_probs(level_probs, tax.num_levels, "level") or _check_probs(type_probs, tax.num_types, "type")
        if problem:
            return self.error_decision(problem, level_probs, type_probs)

        named = tuple(zip(tax.type_names, type_probs))
        risk_level = max(range(len(level_probs)), key=level_probs.__getitem__)
        risk_type = tax.type_names[max(range(len(type_probs)), key=type_probs.__getitem__)]
        # P(level >= k) for k = 0..n-1
        at_least = [sum(level_probs[k:]) for k in range(len(level_probs))]
        risky_mass = 1.0 - type_probs[tax.safe_type_id]
        best = ("allow", -1.0, None, None)  # (action, score, type, hint level)
        for t, p_type in named:
            if t == tax.safe_type or t in switched_off:
                continue
            rule = self.rule(t)
            if not rule.enabled:
                continue
            given_risky = p_type / risky_mass if risky_mass > 1e-12 else 0.0
            candidate = None
            if rule.refuse_threshold is not None:
                score = at_least[rule.refuse_level] * given_risky
                if score >= rule.refuse_threshold:
                    candidate = ("refuse", score, t, None)
            if candidate is None and rule.hint_threshold is not None:
                levels = [k for k in range(rule.hint_level, tax.num_levels)
                          if at_least[k] * given_risky >= rule.hint_threshold]
                if levels:
                    k = max(levels)
                    candidate = ("hint", at_least[rule.hint_level] * given_risky, t, k)
            if candidate and (_ACTION_RANK[candidate[0]], candidate[1]) > (_ACTION_RANK[best[0]], best[1]):
                best = candidate
        action, score, decided_by, hint_level = best
        return Decision(
            action=action,
            risk_level=risk_level,
            risk_type=risk_type,
            level_probs=level_probs,
            type_probs=named,
            decided_by=decided_by,
            score=None if decided_by is None else score,
            hint_level=hint_level,
            hint=self.hint_text(decided_by, hint_level) if action == "hint" else None,
            refusal=self.refusal_text(decided_by) if action == "refuse" else None,
        )

    def error_decision(self, reason: str, level_probs: Sequence[float] = (), type_probs: Sequence[float] = ()) -> Decision:
        """The fail-closed decision (``on_error``), logged as a warning."""
        tax = self.taxonomy
        action = self.on_error
        logger.warning("safety head output unusable (%s): action %s (policy %s, on_error)", reason, action, self.name)
        top = tax.num_levels - 1
        type_probs = tuple(type_probs)
        return Decision(
            action=action,
            risk_level=-1,
            risk_type="unknown",
            level_probs=tuple(level_probs),
            type_probs=tuple(zip(tax.type_names, type_probs)) if len(type_probs) == tax.num_types else (),
            hint_level=top if action == "hint" else None,
            hint=self.hint_text(DEFAULT_RULE, top) if action == "hint" else None,
            refusal=self.refusal_text(None) if action == "refuse" else None,
            error=reason,
        )

    def decide_batch(self, level_probs, type_probs, overrides=None) -> list[Decision]:
        """Decisions for a batch: level_probs (B, num_levels), type_probs (B, num_types) as
        tensors or nested sequences; ``overrides`` one for all or a list of B (None allowed)."""
        if hasattr(level_probs, "detach"):
            level_probs = level_probs.detach().float().cpu().tolist()
        if hasattr(type_probs, "detach"):
            type_probs = type_probs.detach().float().cpu().tolist()
        if len(level_probs) != len(type_probs):
            raise ValueError(f"got {len(level_probs)} level rows but {len(type_probs)} type rows")
        per_sample = _per_sample(overrides, len(level_probs))
        return [self.decide(lp, tp, ov) for lp, tp, ov in zip(level_probs, type_probs, per_sample)]


def _read_yaml(path: Path):
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"policy file not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: invalid YAML ({err})") from None


def _resolve_policy_path(name_or_path: str, folder: Path | None = None) -> Path:
    text = str(name_or_path)
    if Path(text).suffix in (".yaml", ".yml") or os.sep in text:
        path = Path(text)
        return path if path.is_absolute() or folder is None else folder / path
    if text not in shipped_policies():
        raise ValueError(f"unknown policy {text!r}; shipped: {', '.join(shipped_policies())} (or pass a .yaml path)")
    return POLICIES_DIR / f"{text}.yaml"


def _read_parent(extends, source: str, seen: tuple[str, ...], folder: Path | None = None) -> dict:
    """The raw mapping of the policy named by ``extends``, its own parents merged in; errors
    name ``source``, the file that says ``extends``."""
    try:
        path = _resolve_policy_path(str(extends), folder)
    except ValueError as err:
        raise ValueError(f"{source}: extends: {err}") from None
    key = str(path.resolve())
    if key in seen:
        raise ValueError(f"{source}: 'extends' forms a cycle through {path}")
    try:
        data = _read_yaml(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{source}: extends: {err}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: a policy must be a YAML mapping, got {type(data).__name__}")
    if data.get("extends"):
        data = _merge(_read_parent(data["extends"], str(path), (*seen, key), path.parent), data)
    return dict(data)


def _merge(parent: Mapping, child: Mapping) -> dict:
    """``child`` over ``parent``: rules field by field per type, hints level by level per type,
    refusals per type; every other key (and ``name``) from the child when it sets it."""
    out = {k: v for k, v in parent.items() if k not in ("extends", "name", "description")}
    for key, value in child.items():
        if key == "extends":
            continue
        if key in ("rules", "hints") and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            merged = {t: dict(v or {}) for t, v in out[key].items()}
            for t, entry in value.items():
                merged[t] = {**merged.get(t, {}), **dict(entry or {})}
            out[key] = merged
        elif key == "refusals" and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _per_sample(value, n: int) -> list:
    if value is None or isinstance(value, PolicyOverrides):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"got {len(value)} overrides for {n} inputs")
    return value


def _check_probs(probs: tuple[float, ...], expected: int, what: str) -> str | None:
    if len(probs) != expected:
        return f"{what} probabilities have {len(probs)} entries, the taxonomy has {expected}"
    if not all(math.isfinite(p) for p in probs):
        return f"{what} probabilities are not finite: {list(probs)}"
    if any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > _PROB_SUM_TOLERANCE:
        return f"{what} probabilities do not form a distribution (sum {sum(probs):.4f})"
    return None


# -- shipped policies -----------------------------------------------------------------------------
def shipped_policies() -> list[str]:
    """Names of the policies shipped in ``safevlm/policies/``."""
    return sorted(p.stem for p in POLICIES_DIR.glob("*.yaml"))


def load_policy(name_or_path: str | os.PathLike | Policy | None = None, taxonomy: Taxonomy | None = None) -> Policy:
    """A policy by shipped name (``"default"``, ``"strict"``, ``"hint_only"``) or YAML path;
    None gives the default; a :class:`Policy` is returned as is."""
    if isinstance(name_or_path, Policy):
        return name_or_path
    return Policy.from_yaml(_resolve_policy_path("default" if name_or_path is None else str(name_or_path)), taxonomy)


def policy_summary(policy: Policy) -> dict:
    """What each risk type gets under a policy, for display (CLI, /health)."""
    tax = policy.taxonomy
    out = {}
    for t in tax.type_names:
        if t == tax.safe_type:
            continue
        r = policy.rule(t)
        out[t] = {
            "enabled": r.enabled,
            "hint": None if r.hint_threshold is None else f"p(>= {tax.level_names[r.hint_level]}) >= {r.hint_threshold}",
            "refuse": None if r.refuse_threshold is None else f"p(>= {tax.level_names[r.refuse_level]}) >= {r.refuse_threshold}",
            "relaxable": t in policy.relaxable_types,
        }
    return out


__all__ = [
    "ACTIONS",
    "DEFAULT_RULE",
    "HINT_POSITIONS",
    "Decision",
    "Policy",
    "PolicyOverrideError",
    "PolicyOverrides",
    "TypeRule",
    "load_policy",
    "policy_summary",
    "shipped_policies",
]
