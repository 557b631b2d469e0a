"""Routing rules: which series the node classifies, classifies in shadow, or ignores.

A rule is data, never code: a name, an action, the destinations its results go to, and
conditions (``when``) on header attributes named by their DICOM keyword, plus the calling AE
title (``CallingAETitle``). Each condition is one of

- a plain value: equality (``Modality = "CT"``, ``SliceThickness = 1.0``);
- ``{ in = [...] }``: one of a list;
- ``{ regex = "..." }``: a regular expression found in the value (``re.search``; anchor it with
  ``^...$`` to match the whole value);
- ``{ min = ..., max = ... }``: a numeric range, both ends included (either may be left out);
- ``{ present = true | false }``: the attribute is there with a value, or is absent or empty.

A multi-valued attribute (``ImageType``, say) matches equality, ``in`` and ``regex`` when its
whole value (values joined by a backslash, as DICOM writes them) or any one of its values does.
A condition on an absent attribute fails, except ``present = false``. Every condition of a rule
must hold; the first rule that matches wins, and the last rule must have no conditions (the
default, so that no series falls through unnoticed).

Values from the configuration are only ever compared: a value such as ``__import__('os')`` is a
string like any other. Keywords, regular expressions, ranges and actions are checked when the
rules are read, and a bad one is an error naming its key (``rule[2].when.SliceThicknes``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from ctcovid.errors import ConfigError

ACTIONS = ("classify", "shadow", "ignore")
CALLING_AE_TITLE = "CallingAETitle"
#: The keywords documented as the ones sites route on; any other DICOM keyword works as well.
COMMON_KEYWORDS = (
    "Modality",
    "BodyPartExamined",
    "SeriesDescription",
    "ProtocolName",
    "SliceThickness",
    "ConvolutionKernel",
    "ContrastBolusAgent",
    "StationName",
    "Manufacturer",
    "ManufacturerModelName",
    CALLING_AE_TITLE,
)
_OPERATORS = frozenset({"in", "regex", "min", "max", "present"})
_RULE_KEYS = frozenset({"name", "when", "action", "destinations"})
#: Value representations that hold one binary blob, not something a rule could compare.
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "SQ"})


@dataclass(frozen=True)
class Condition:
    """One test of one attribute. Exactly one kind is set: ``equals``, ``one_of``, ``regex``,
    a range (``minimum`` and/or ``maximum``) or ``present``."""

    keyword: str
    equals: str | float | None = None
    one_of: tuple[str | float, ...] | None = None
    regex: re.Pattern[str] | None = None
    minimum: float | None = None
    maximum: float | None = None
    present: bool | None = None

    def describe(self) -> str:
        """The condition as a reader of the configuration wrote it."""
        if self.present is not None:
            return "present" if self.present else "absent"
        if self.regex is not None:
            return f"matches /{self.regex.pattern}/"
        if self.one_of is not None:
            return "one of " + ", ".join(_show(v) for v in self.one_of)
        if self.minimum is not None or self.maximum is not None:
            low = "" if self.minimum is None else f"{_show(self.minimum)} <= "
            high = "" if self.maximum is None else f" <= {_show(self.maximum)}"
            return f"{low}value{high}"
        return f"= {_show(self.equals)}"

    def test(self, values: Sequence[str] | None) -> bool:
        """Whether the attribute's values (None: absent or empty) satisfy the condition."""
        if self.present is not None:
            return (values is not None) == self.present
        if values is None:
            return False
        candidates = ["\\".join(values), *values] if len(values) > 1 else list(values)
        if self.regex is not None:
            return any(self.regex.search(c) for c in candidates)
        if self.one_of is not None:
            return any(_equal(c, v) for c in candidates for v in self.one_of)
        if self.minimum is not None or self.maximum is not None:
            if len(values) != 1:
                return False
            number = _number(values[0])
            if number is None:
                return False
            return (self.minimum is None or number >= self.minimum) and (
                self.maximum is None or number <= self.maximum
            )
        assert self.equals is not None
        return any(_equal(c, self.equals) for c in candidates)


@dataclass(frozen=True)
class Rule:
    """A named rule: when every condition holds, ``action`` with ``destinations`` (None: all)."""

    name: str
    action: str
    conditions: tuple[Condition, ...] = ()
    destinations: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Check:
    """One condition of one rule against one series: what it asked, what the series has."""

    keyword: str
    condition: str
    value: str | None
    matched: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "keyword": self.keyword,
            "condition": self.condition,
            "value": self.value,
            "matched": self.matched,
        }


@dataclass(frozen=True)
class Decision:
    """The rule a series matched, and for every rule tried up to it, each condition checked."""

    rule: Rule
    tried: tuple[tuple[Rule, tuple[Check, ...]], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule.name,
            "action": self.rule.action,
            "destinations": list(self.rule.destinations)
            if self.rule.destinations is not None
            else None,
            "tried": [
                {
                    "rule": rule.name,
                    "matched": all(c.matched for c in checks),
                    "conditions": [c.to_dict() for c in checks],
                }
                for rule, checks in self.tried
            ],
        }


#: With no rules configured the node classifies every series and sends to every destination.
DEFAULT_RULES = (Rule(name="default", action="classify"),)


def _show(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, str) else str(value)


def _number(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _equal(text: str, wanted: str | float) -> bool:
    if isinstance(wanted, str):
        return text.strip() == wanted.strip()
    number = _number(text)
    return number is not None and number == wanted


def attribute_values(header: Dataset, keyword: str) -> tuple[str, ...] | None:
    """The values of the attribute ``keyword`` as text; None when absent or empty."""
    value = header.get(keyword)
    if value is None or value == "":
        return None
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    texts = tuple(str(v).strip() for v in items)
    return texts if any(texts) else None


# -- reading rules from the configuration -------------------------------------------------------


def _scalar(value: object, key: str) -> str | float:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f"{key}: expected a string or a number, got {value!r}")
    return value if isinstance(value, str) else float(value)


def _bound(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    return float(value)


def _condition(keyword: str, spec: object, key: str) -> Condition:
    if keyword != CALLING_AE_TITLE:
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise ConfigError(f"{key}: {keyword!r} is not a DICOM attribute keyword")
        if set(dictionary_VR(tag).split(" or ")) & _BINARY_VRS:
            raise ConfigError(f"{key}: {keyword} holds binary data or a sequence; no rule tests it")
    if not isinstance(spec, dict):
        return Condition(keyword, equals=_scalar(spec, key))
    unknown = sorted(set(spec) - _OPERATORS)
    if unknown or not spec:
        raise ConfigError(
            f"{key}: unknown test {', '.join(unknown) or '(none)'}; "
            "use a value, or one of: in, regex, min/max, present"
        )
    if "min" in spec or "max" in spec:
        if set(spec) - {"min", "max"}:
            raise ConfigError(f"{key}: min/max cannot be combined with another test")
        low = _bound(spec["min"], f"{key}.min") if "min" in spec else None
        high = _bound(spec["max"], f"{key}.max") if "max" in spec else None
        if low is not None and high is not None and low > high:
            raise ConfigError(f"{key}: min {low:g} is above max {high:g}")
        return Condition(keyword, minimum=low, maximum=high)
    if len(spec) != 1:
        raise ConfigError(f"{key}: one test per attribute ({', '.join(sorted(spec))} given)")
    ((operator, value),) = spec.items()
    if operator == "present":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}.present: expected true or false, got {value!r}")
        return Condition(keyword, present=value)
    if operator == "regex":
        if not isinstance(value, str):
            raise ConfigError(f"{key}.regex: expected a string, got {value!r}")
        try:
            return Condition(keyword, regex=re.compile(value))
        except re.error as exc:
            raise ConfigError(f"{key}.regex: not a valid regular expression: {exc}") from None
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}.in: expected a non-empty list, got {value!r}")
    return Condition(
        keyword, one_of=tuple(_scalar(v, f"{key}.in[{i}]") for i, v in enumerate(value))
    )


def parse_rules(
    tables: Sequence[Mapping[str, Any]], destinations: Iterable[str] | None = None
) -> tuple[Rule, ...]:
    """Rules from the ``[[rule]]`` tables of a configuration, checked; :data:`DEFAULT_RULES`
    when there are none.

    ``destinations``: the names a rule may send to (None: do not check the names).

    Raises
    ------
    ConfigError
        For anything a rule should not say, naming its key: an unknown key or keyword, a bad
        regular expression or range, an unknown action or destination, two rules of one name,
        or a last rule that has conditions.
    """
    if not tables:
        return DEFAULT_RULES
    known = None if destinations is None else set(destinations)
    rules: list[Rule] = []
    for i, table in enumerate(tables):
        where = f"rule[{i}]"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: expected a table ([[rule]]), got {table!r}")
        unknown = sorted(set(table) - _RULE_KEYS)
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(_RULE_KEYS))}"
            )
        name = table.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}.name: every rule needs a name")
        if any(r.name == name for r in rules):
            raise ConfigError(f"{where}.name: a rule named {name!r} comes earlier")
        action = table.get("action", "classify")
        if action not in ACTIONS:
            raise ConfigError(
                f"{where}.action: {action!r} is not one of {', '.join(ACTIONS)} (rule {name!r})"
            )
        when = table.get("when", {})
        if not isinstance(when, Mapping):
            raise ConfigError(f"{where}.when: expected a table ([rule.when]), got {when!r}")
        conditions = tuple(
            _condition(str(keyword), spec, f"{where}.when.{keyword}")
            for keyword, spec in when.items()
        )
        names = table.get("destinations")
        listed: tuple[str, ...] | None = None
        if names is not None:
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ConfigError(f"{where}.destinations: expected a list of destination names")
            if known is not None:
                missing = [n for n in names if n not in known]
                if missing:
                    raise ConfigError(
                        f"{where}.destinations: no destination named {', '.join(missing)} "
                        f"(configured: {', '.join(sorted(known)) or 'none'})"
                    )
            listed = tuple(names)
        rules.append(Rule(name=name, action=action, conditions=conditions, destinations=listed))
    if rules[-1].conditions:
        raise ConfigError(
            f"rule[{len(rules) - 1}].when: the last rule ({rules[-1].name!r}) must have no "
            "conditions: it is the default for every series the others do not match"
        )
    return tuple(rules)


# -- deciding ----------------------------------------------------------------------------------


def decide(rules: Sequence[Rule], header: Dataset, calling_aet: str = "") -> Decision:
    """The first rule whose conditions all hold for the series ``header`` (any one instance's
    header: the attributes rules test are the series'), with every check made on the way."""
    tried: list[tuple[Rule, tuple[Check, ...]]] = []
    for rule in rules:
        checks = []
        for condition in rule.conditions:
            values: tuple[str, ...] | None
            if condition.keyword == CALLING_AE_TITLE:
                values = (calling_aet.strip(),) if calling_aet.strip() else None
            else:
                values = attribute_values(header, condition.keyword)
            checks.append(
                Check(
                    keyword=condition.keyword,
                    condition=condition.describe(),
                    value=None if values is None else "\\".join(values),
                    matched=condition.test(values),
                )
            )
        tried.append((rule, tuple(checks)))
        if all(c.matched for c in checks):
            return Decision(rule=rule, tried=tuple(tried))
    # parse_rules makes the last rule unconditional; rules built by hand may not end in one.
    raise ConfigError("no rule matched and the rules have no default (a last rule without when)")
