"""Which metrics a PromQL expression reads, and which series names a /metrics page can serve.

Good enough for our own rules and dashboard, not a PromQL parser: strings, label matchers,
ranges, grouping clauses and offsets are blanked out, then every identifier that is not a
function call or keyword is a metric name. Selectors keep their exact ``label="value"`` matchers
so a typo in a tier or source value is caught too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
             "and", "or", "unless", "inf", "nan"}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!=|!~|=)\s*"((?:[^"\\]|\\.)*)"')
_IDENT = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(\s*\()?")

# Grafana's template variables, replaced by values that keep the expression valid PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h",
                     "${datasource}": "x", "$job": ".*", "$instance": ".*"}  # fmt: skip


def substitute_grafana(expr: str) -> str:
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    return expr


def metric_names(expr: str) -> set[str]:
    text = re.sub(r"#[^\n]*", "", expr)
    text = _STRING.sub('""', text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\boffset\s+-?\w+", " ", text)
    names = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def exact_matchers(expr: str) -> list[tuple[str, str, str]]:
    """(metric, label, value) for every ``metric{label="value"}`` matcher in the expression."""
    out = []
    for selector in _SELECTOR.finditer(expr):
        for label, op, value in _MATCHER.findall(selector.group(2)):
            if op == "=":
                out.append((selector.group(1), label, value))
    return out


def grouping_labels(expr: str) -> set[str]:
    labels: set[str] = set()
    for match in _GROUPING.finditer(_STRING.sub('""', expr)):
        labels.update(part.strip() for part in match.group(2).split(",") if part.strip())
    return labels


_SUFFIXES = {
    "counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "untyped": ("",), "unknown": ("",),
    "info": ("_info",), "stateset": ("",), "gaugehistogram": ("_bucket",),
}  # fmt: skip


@dataclass(frozen=True)
class Exposition:
    """A parsed /metrics page: series names it can serve and the label sets seen per name."""

    types: dict[str, str]  # family name -> type, from the # TYPE lines
    samples: dict[str, list[dict[str, str]]]  # sample name -> label sets of its samples

    @classmethod
    def parse(cls, text: str) -> Exposition:
        from prometheus_client.parser import text_string_to_metric_families

        types: dict[str, str] = {}
        samples: dict[str, list[dict[str, str]]] = {}
        for family in text_string_to_metric_families(text):
            types[family.name] = family.type
            for sample in family.samples:
                samples.setdefault(sample.name, []).append(dict(sample.labels))
        return cls(types, samples)

    def series_names(self) -> set[str]:
        """Every name a query may use: the samples present plus the suffixed names of each typed
        family (a labelled family exposes no sample until its first observation)."""
        names = set(self.samples)
        for family, kind in self.types.items():
            names.update(family + suffix for suffix in _SUFFIXES.get(kind, ("",)))
        return names

    def labels_of(self, name: str) -> set[str]:
        return {label for labels in self.samples.get(name, []) for label in labels}

    def has_label_value(self, name: str, label: str, value: str) -> bool:
        return any(labels.get(label) == value for labels in self.samples.get(name, []))


ALWAYS_THERE = {"up"}  # written by Prometheus itself for every target
IMPLICIT_LABELS = {"le", "job", "instance", "quantile"}
# Labels whose values depend on traffic (one completion cannot show a 503): only the label
# name is checked for these; tier, source and finish_reason values must have been seen.
OPEN_LABELS = {"status", "endpoint"}


def problems(expr: str, exposition: Exposition, recorded: set[str]) -> list[str]:
    """What in ``expr`` the server does not export: unknown metric names, label values never
    seen on a metric that has samples, grouping labels none of its metrics carries."""
    found: list[str] = []
    served = exposition.series_names()
    names = metric_names(expr)
    for name in sorted(names - served - recorded - ALWAYS_THERE):
        found.append(f"{name} is not exported")
    for name, label, value in exact_matchers(expr):
        if name not in served or not exposition.samples.get(name):
            continue
        if label in OPEN_LABELS:
            if label not in exposition.labels_of(name):
                found.append(f"{name} has no label {label!r}")
        elif not exposition.has_label_value(name, label, value):
            found.append(f'{name}{{{label}="{value}"}} matches no exported series')
    exported = names & served
    carried = set().union(*(exposition.labels_of(n) for n in exported)) if exported else set()
    if exported and not names & recorded:
        for label in sorted(grouping_labels(expr) - IMPLICIT_LABELS - carried):
            found.append(f"grouping label {label!r} is on none of {sorted(exported)}")
    return found
