"""ScopePolicy as plain JSON, checked with the standard library (docs/policy.md).

Agents may not import the core library, so this module re-states what the scope agent needs: the
shape of a ScopePolicy, the most restrictive policy over a schema, a conservative "is it narrower?"
check, and the meet of two policies. The runner validates every policy again with the real model
(``hivemind.policy``); tests/agents check that what this module accepts, the runner accepts too.

Policies here are normalized dicts with every section present::

    {"tables": {t: {"columns": [...], "where": str | None}},
     "aggregate": {"required": bool, "min_group_size": int, "functions": [...]},
     "max_rows": int,
     "items": {"allow": [{"id": ...} | {"meta": {...}}], "redact": [...]},
     "output": {"deny": [...], "redact": [...]}}
"""

from __future__ import annotations

import copy
import re
import re._constants as sre_constants  # the stdlib regex parser, to refuse catastrophic patterns early
import re._parser as sre_parser
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

FUNCTIONS = ("COUNT", "SUM", "AVG", "MIN", "MAX")
SECTIONS = ("tables", "aggregate", "max_rows", "items", "output")
DEFAULT_MIN_GROUP_SIZE = 10
DEFAULT_MAX_ROWS = 100
MAX_NAME_LENGTH = 64
MAX_TABLES = 256
MAX_COLUMNS = 1024
MAX_PREDICATE_LENGTH = 4096
MAX_PATTERN_LENGTH = 256
MAX_PATTERNS = 64
MAX_ITEM_RULES = 4096
MAX_META_KEYS = 16
MAX_META_TEXT = 256
MAX_ROWS_LIMIT = 1_000_000
MAX_MIN_GROUP_SIZE = 1_000_000

_NAME = re.compile(r"[a-z0-9_]+")
_ITEM_ID = re.compile(r"[a-z][a-z0-9]*_[a-z0-9]{1,64}")
# Words of the row-filter grammar that are not column names.
_PREDICATE_KEYWORDS = frozenset({"and", "or", "not", "in", "between", "like", "is", "null", "true", "false"})
_TOKEN = re.compile(
    r"'(?:[^']|'')*'"  # string literal
    r'|"(?:[^"]|"")*"'  # quoted identifier
    r"|0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"  # number
    r"|[A-Za-z_][A-Za-z0-9_]*|--|/\*|[();]|.",
    re.DOTALL,
)


class PolicyError(ValueError):
    """A policy that the runner would refuse. The message lists every problem with its path."""


# --- validation ----------------------------------------------------------------------------------


class _Problems:
    def __init__(self) -> None:
        self.found: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.found.append(f"{path}: {message}")

    def raise_if_any(self) -> None:
        if self.found:
            raise PolicyError("; ".join(self.found))


def _is_int(value: Any) -> bool:
    # bool is an int subclass; true/false is not a number of rows.
    return isinstance(value, int) and not isinstance(value, bool)


def _known_keys(value: Mapping[str, Any], allowed: Iterable[str], path: str, problems: _Problems) -> None:
    allowed = tuple(allowed)
    for key in value:
        if key not in allowed:
            problems.add(f"{path}.{key}", f"unknown field (expected one of {', '.join(allowed)})")


def _name(value: Any, path: str, problems: _Problems) -> bool:
    if not isinstance(value, str) or not _NAME.fullmatch(value) or len(value) > MAX_NAME_LENGTH:
        problems.add(path, f"{value!r} is not a normalized name (lowercase letters, digits, underscores)")
        return False
    return True


def _regex_shape_problem(items: Iterable[tuple[Any, Any]], inside_repeat: bool) -> str | None:
    """The first construct that can backtrack catastrophically (the runner's rule, docs/policy.md)."""
    repeats = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT, sre_constants.POSSESSIVE_REPEAT}
    leaves = {
        sre_constants.LITERAL,
        sre_constants.NOT_LITERAL,
        sre_constants.IN,
        sre_constants.ANY,
        sre_constants.AT,
    }
    for op, av in items:
        if op in repeats:
            low, high, body = av
            if inside_repeat and high != low:
                return "nested quantifier (a variable repeat inside a repeated group)"
            problem = _regex_shape_problem(body, inside_repeat or high > 1)
        elif op is sre_constants.SUBPATTERN:
            problem = _regex_shape_problem(av[3], inside_repeat)
        elif op is sre_constants.ATOMIC_GROUP:
            problem = _regex_shape_problem(av, inside_repeat)
        elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            problem = _regex_shape_problem(av[1], inside_repeat)
        elif op is sre_constants.BRANCH:
            if inside_repeat:
                return "alternation inside a repeated group"
            problem = next(
                (found for branch in av[1] if (found := _regex_shape_problem(branch, False))), None
            )
        elif op in (sre_constants.GROUPREF, sre_constants.GROUPREF_EXISTS):
            return "backreference or conditional group"
        elif op in leaves:
            problem = None
        else:
            return f"unsupported construct {op}"
        if problem is not None:
            return problem
    return None


def pattern_problem(pattern: Any) -> str | None:
    """Why the runner would refuse this deny/redact regex, or None when it is acceptable."""
    if not isinstance(pattern, str) or not pattern:
        return "a pattern must be a non-empty string"
    if len(pattern) > MAX_PATTERN_LENGTH:
        return f"pattern longer than {MAX_PATTERN_LENGTH} characters"
    try:
        re.compile(pattern)
        parsed = sre_parser.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        return f"pattern {pattern!r} does not compile: {exc}"
    shape = _regex_shape_problem(parsed, inside_repeat=False)
    if shape is not None:
        return f"pattern {pattern!r} refused: {shape} can backtrack catastrophically"
    return None


def _patterns(value: Any, path: str, problems: _Problems) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        problems.add(path, "must be a list of regular expressions")
        return []
    if len(value) > MAX_PATTERNS:
        problems.add(path, f"more than {MAX_PATTERNS} patterns")
    for index, pattern in enumerate(value):
        problem = pattern_problem(pattern)
        if problem is not None:
            problems.add(f"{path}[{index}]", problem)
    if len(set(map(str, value))) != len(value):
        problems.add(path, "duplicate pattern")
    return [str(pattern) for pattern in value]


def _predicate_tokens(where: str) -> list[str]:
    return _TOKEN.findall(where)


def _token_problem(part: str) -> str | None:
    problems = {
        ";": "row filter holds a semicolon: exactly one predicate, no statements",
        "--": "row filter holds a comment: comments are not allowed",
        "/*": "row filter holds a comment: comments are not allowed",
    }
    if part in problems:
        return problems[part]
    if part[0] in "'\"" and (len(part) < 2 or part[-1] != part[0]):
        return "row filter has an unterminated quote"
    quoted = part[0] == '"'
    is_keyword = not quoted and part.lower() in _PREDICATE_KEYWORDS
    if not (quoted or part[0].isalpha() or part[0] == "_") or is_keyword:
        return None
    name = part[1:-1].replace('""', '"') if quoted else part
    if not _NAME.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
        return f"column {name!r} is not a normalized name (lowercase letters, digits, underscores)"
    return None


def predicate_problem(where: str) -> str | None:
    """A cheap pre-check of a row filter; the runner parses it fully (docs/policy.md grammar).

    Catches what makes combining filters unsafe or an error obvious: statement separators, comments,
    unbalanced parentheses, unterminated quotes and column names that are not normalized.
    """
    if not where.strip():
        return "empty row filter (use null for no filter)"
    if len(where) > MAX_PREDICATE_LENGTH:
        return f"row filter longer than {MAX_PREDICATE_LENGTH} characters"
    depth = 0
    for part in _predicate_tokens(where):
        problem = _token_problem(part)
        if problem is not None:
            return problem
        depth += {"(": 1, ")": -1}.get(part, 0)
        if depth < 0:
            break
    return None if depth == 0 else "row filter has unbalanced parentheses"


def where_columns(where: str | None) -> set[str]:
    """The column names a row filter references (it may use columns the query stage does not see)."""
    if where is None:
        return set()
    names = set()
    for part in _predicate_tokens(where):
        if part[0] == '"':
            names.add(part[1:-1].replace('""', '"'))
        elif (part[0].isalpha() or part[0] == "_") and part.lower() not in _PREDICATE_KEYWORDS:
            names.add(part)
    return names


def _tables(value: Any, problems: _Problems) -> dict[str, dict[str, Any]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.add("tables", "must be a mapping of table name to {columns, where}")
        return {}
    if len(value) > MAX_TABLES:
        problems.add("tables", f"more than {MAX_TABLES} tables")
    tables: dict[str, dict[str, Any]] = {}
    for table, spec in value.items():
        path = f"tables.{table}"
        if not _name(table, f"{path} (name)", problems):
            continue
        if not isinstance(spec, dict):
            problems.add(path, "must be a mapping with columns (and optionally where)")
            continue
        _known_keys(spec, ("columns", "where"), path, problems)
        columns = spec.get("columns")
        if not isinstance(columns, list) or not columns:
            problems.add(f"{path}.columns", "must be a non-empty list of column names")
            continue
        if len(columns) > MAX_COLUMNS:
            problems.add(f"{path}.columns", f"more than {MAX_COLUMNS} columns")
        good = [column for i, column in enumerate(columns) if _name(column, f"{path}.columns[{i}]", problems)]
        if len(set(good)) != len(good):
            problems.add(f"{path}.columns", "duplicate column")
        where = spec.get("where")
        if where is not None:
            if not isinstance(where, str):
                problems.add(f"{path}.where", "must be a string (a SQL predicate) or null")
                where = None
            elif (problem := predicate_problem(where)) is not None:
                problems.add(f"{path}.where", problem)
        tables[table] = {"columns": list(good), "where": where}
    return tables


def _functions(value: Any, problems: _Problems) -> list[str] | None:
    if not isinstance(value, list):
        problems.add("aggregate.functions", f"must be a list of {', '.join(FUNCTIONS)}")
        return None
    # Case-insensitive: YAML authors write `avg` as often as `AVG`.
    names = [str(name).upper() if isinstance(name, str) else name for name in value]
    unknown = [repr(name) for name in names if name not in FUNCTIONS]
    if unknown:
        problems.add("aggregate.functions", f"unknown function(s) {', '.join(unknown)}")
        return None
    if len(set(names)) != len(names):
        problems.add("aggregate.functions", "duplicate function")
        return None
    return names


def _aggregate(value: Any, problems: _Problems) -> dict[str, Any]:
    result: dict[str, Any] = {
        "required": True,
        "min_group_size": DEFAULT_MIN_GROUP_SIZE,
        "functions": ["COUNT"],
    }
    if value is None:
        return result
    if not isinstance(value, dict):
        problems.add("aggregate", "must be a mapping (required, min_group_size, functions)")
        return result
    _known_keys(value, ("required", "min_group_size", "functions"), "aggregate", problems)
    if "required" in value:
        if not isinstance(value["required"], bool):
            problems.add("aggregate.required", "must be true or false")
        else:
            result["required"] = value["required"]
    if "min_group_size" in value:
        size = value["min_group_size"]
        if not _is_int(size) or not 1 <= size <= MAX_MIN_GROUP_SIZE:
            problems.add("aggregate.min_group_size", f"must be an integer from 1 to {MAX_MIN_GROUP_SIZE}")
        else:
            result["min_group_size"] = size
    if "functions" in value:
        functions = _functions(value["functions"], problems)
        if functions is not None:
            result["functions"] = functions
    return result


def _item_rule(rule: Any, path: str, problems: _Problems) -> dict[str, Any] | None:
    if isinstance(rule, dict) and set(rule) == {"id"}:
        if not isinstance(rule["id"], str) or not _ITEM_ID.fullmatch(rule["id"]):
            problems.add(f"{path}.id", f"{rule['id']!r} is not an item id (like item_abc123)")
            return None
        return {"id": rule["id"]}
    if isinstance(rule, dict) and set(rule) == {"meta"} and isinstance(rule["meta"], dict) and rule["meta"]:
        meta: dict[str, str] = {}
        if len(rule["meta"]) > MAX_META_KEYS:
            problems.add(f"{path}.meta", f"more than {MAX_META_KEYS} keys")
        for key, value in rule["meta"].items():
            if not _name(key, f"{path}.meta (name)", problems):
                continue
            # YAML reads `year: 2024` as a number; metadata values are compared as strings.
            text = str(value) if _is_int(value) else value
            if not isinstance(text, str) or not 1 <= len(text) <= MAX_META_TEXT:
                problems.add(f"{path}.meta.{key}", f"must be a string of 1-{MAX_META_TEXT} characters")
                continue
            meta[key] = text
        return {"meta": meta}
    problems.add(path, 'an item rule is {"id": "<item id>"} or {"meta": {"<key>": "<value>"}}')
    return None


def _items(value: Any, problems: _Problems) -> dict[str, Any]:
    if value is None:
        return {"allow": [], "redact": []}
    if not isinstance(value, dict):
        problems.add("items", "must be a mapping (allow, redact)")
        return {"allow": [], "redact": []}
    _known_keys(value, ("allow", "redact"), "items", problems)
    allow_raw = value.get("allow") or []
    allow: list[dict[str, Any]] = []
    if not isinstance(allow_raw, list):
        problems.add("items.allow", "must be a list of item rules")
    else:
        if len(allow_raw) > MAX_ITEM_RULES:
            problems.add("items.allow", f"more than {MAX_ITEM_RULES} rules")
        for index, rule in enumerate(allow_raw):
            checked = _item_rule(rule, f"items.allow[{index}]", problems)
            if checked is not None:
                allow.append(checked)
        if len({_rule_key(rule) for rule in allow}) != len(allow):
            problems.add("items.allow", "duplicate item rule")
    return {"allow": allow, "redact": _patterns(value.get("redact"), "items.redact", problems)}


def _output(value: Any, problems: _Problems) -> dict[str, Any]:
    if value is None:
        return {"deny": [], "redact": []}
    if not isinstance(value, dict):
        problems.add("output", "must be a mapping (deny, redact)")
        return {"deny": [], "redact": []}
    _known_keys(value, ("deny", "redact"), "output", problems)
    return {
        "deny": _patterns(value.get("deny"), "output.deny", problems),
        "redact": _patterns(value.get("redact"), "output.redact", problems),
    }


def normalize(data: Any) -> dict[str, Any]:
    """A ScopePolicy (decoded JSON or YAML) checked and with every omitted section at its strictest.

    Raises :class:`PolicyError` listing every problem as ``path: message``.
    """
    problems = _Problems()
    if not isinstance(data, Mapping):
        raise PolicyError("a policy must be a mapping")
    _known_keys(data, SECTIONS, "policy", problems)
    max_rows = data.get("max_rows", DEFAULT_MAX_ROWS)
    if not _is_int(max_rows) or not 0 <= max_rows <= MAX_ROWS_LIMIT:
        problems.add("max_rows", f"must be an integer from 0 to {MAX_ROWS_LIMIT}")
        max_rows = DEFAULT_MAX_ROWS
    policy = {
        "tables": _tables(data.get("tables"), problems),
        "aggregate": _aggregate(data.get("aggregate"), problems),
        "max_rows": max_rows,
        "items": _items(data.get("items"), problems),
        "output": _output(data.get("output"), problems),
    }
    problems.raise_if_any()
    return policy


def most_restrictive(schema: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Every table and column of ``schema``, aggregate-only with COUNT over groups of 10+, no items.

    The same policy as ``hivemind.policy.most_restrictive_policy(schema)``.
    """
    return normalize({"tables": {table: {"columns": list(columns)} for table, columns in schema.items()}})


def check_against_schema(policy: Mapping[str, Any], schema: Mapping[str, Sequence[str]]) -> None:
    """Refuse a policy naming a table or column the room's data does not have (listed or filtered on)."""
    problems = _Problems()
    for table, spec in policy["tables"].items():
        if table not in schema:
            known = ", ".join(sorted(schema)) or "none"
            problems.add(f"tables.{table}", f"no such table in the room data (tables: {known})")
            continue
        missing = [column for column in spec["columns"] if column not in schema[table]]
        if missing:
            problems.add(
                f"tables.{table}.columns",
                f"no such column(s) {', '.join(missing)} (columns: {', '.join(schema[table])})",
            )
        missing = sorted(column for column in where_columns(spec["where"]) if column not in schema[table])
        if missing:
            problems.add(f"tables.{table}.where", f"no such column(s) {', '.join(missing)}")
    problems.raise_if_any()


# --- narrowing -----------------------------------------------------------------------------------


def _rule_key(rule: Mapping[str, Any]) -> tuple[str, tuple[tuple[str, str], ...]]:
    if "id" in rule:
        return ("id", (("id", rule["id"]),))
    return ("meta", tuple(sorted(rule["meta"].items())))


def _rule_covered(rule: Mapping[str, Any], bound: Sequence[Mapping[str, Any]]) -> bool:
    for other in bound:
        if "id" in rule and "id" in other and rule["id"] == other["id"]:
            return True
        # A metadata rule with more pairs matches fewer items.
        if "meta" in rule and "meta" in other and other["meta"].items() <= rule["meta"].items():
            return True
    return False


def conjoin(bound_where: str, extra_where: str) -> str:
    """A filter that keeps every condition of ``bound_where`` and adds ``extra_where``."""
    return f"({bound_where}) AND ({extra_where})"


def keeps_filter(where: str | None, bound_where: str | None) -> bool:
    """True when ``where`` is ``bound_where`` itself or :func:`conjoin` of it and a balanced predicate."""
    if bound_where is None:
        return True
    if where is None:
        return False
    if where == bound_where:
        return True
    prefix = f"({bound_where}) AND ("
    if not (where.startswith(prefix) and where.endswith(")")):
        return False
    rest = where[len(prefix) : -1]
    # A balanced remainder cannot close the parenthesis around itself and escape the AND.
    depth = 0
    for token in _predicate_tokens(rest):
        depth += {"(": 1, ")": -1}.get(token, 0)
        if depth < 0:
            return False
    return depth == 0


def widenings(candidate: Mapping[str, Any], bound: Mapping[str, Any] | None) -> list[str]:
    """Every way ``candidate`` may allow more than ``bound``; empty means narrower. Conservative.

    Row filters count as kept only when spelled as :func:`keeps_filter` expects; the runner's check is
    more lenient (it compares normalized conjuncts), so what passes here passes there.
    """
    if bound is None:
        return []
    found: list[str] = []
    for table, spec in candidate["tables"].items():
        bound_spec = bound["tables"].get(table)
        if bound_spec is None:
            found.append(f"tables.{table}: table not allowed by the bound")
            continue
        extra = [column for column in spec["columns"] if column not in bound_spec["columns"]]
        if extra:
            found.append(f"tables.{table}.columns: {', '.join(extra)} not allowed by the bound")
        if not keeps_filter(spec["where"], bound_spec["where"]):
            found.append(f"tables.{table}.where: does not keep the bound's filter {bound_spec['where']!r}")
    aggregate, bound_aggregate = candidate["aggregate"], bound["aggregate"]
    if bound_aggregate["required"] and not aggregate["required"]:
        found.append("aggregate.required: the bound requires aggregation")
    if aggregate["min_group_size"] < bound_aggregate["min_group_size"]:
        found.append(
            f"aggregate.min_group_size: {aggregate['min_group_size']} is below the bound's "
            f"{bound_aggregate['min_group_size']}"
        )
    extra_functions = [name for name in aggregate["functions"] if name not in bound_aggregate["functions"]]
    if extra_functions:
        found.append(f"aggregate.functions: {', '.join(extra_functions)} not allowed by the bound")
    if candidate["max_rows"] > bound["max_rows"]:
        found.append(f"max_rows: {candidate['max_rows']} exceeds the bound's {bound['max_rows']}")
    found += [
        f"items.allow[{index}]: not covered by the bound's allow rules"
        for index, rule in enumerate(candidate["items"]["allow"])
        if not _rule_covered(rule, bound["items"]["allow"])
    ]
    pattern_lists = [
        ("output.deny", candidate["output"]["deny"], bound["output"]["deny"]),
        ("output.redact", candidate["output"]["redact"], bound["output"]["redact"]),
    ]
    if candidate["items"]["allow"]:
        pattern_lists.append(("items.redact", candidate["items"]["redact"], bound["items"]["redact"]))
    for path, ours, theirs in pattern_lists:
        dropped = [pattern for pattern in theirs if pattern not in ours]
        if dropped:
            found.append(f"{path}: drops the bound's pattern(s) {', '.join(map(repr, dropped))}")
    return found


def _union(first: Sequence[str], second: Sequence[str], path: str) -> list[str]:
    merged = list(first) + [pattern for pattern in second if pattern not in first]
    if len(merged) > MAX_PATTERNS:
        raise PolicyError(f"{path}: combining the policies gives more than {MAX_PATTERNS} patterns")
    return merged


def meet(policy: Mapping[str, Any], bound: Mapping[str, Any] | None) -> dict[str, Any]:
    """The part of ``policy`` that ``bound`` also allows: never wider than either.

    Tables and columns are intersected; filters are combined with AND (a filter may use columns the
    query stage does not see, so the bound's filter keeps working whatever columns remain);
    aggregation takes the stricter of each rule; item rules the bound does not cover are dropped;
    redaction and deny patterns are the union of both lists.
    """
    if bound is None:
        return copy.deepcopy(dict(policy))
    tables: dict[str, dict[str, Any]] = {}
    for table, spec in policy["tables"].items():
        bound_spec = bound["tables"].get(table)
        if bound_spec is None:
            continue
        columns = [column for column in spec["columns"] if column in bound_spec["columns"]]
        if not columns:
            continue
        where = spec["where"]
        if bound_spec["where"] is not None and not keeps_filter(where, bound_spec["where"]):
            where = bound_spec["where"] if where is None else conjoin(bound_spec["where"], where)
        tables[table] = {"columns": columns, "where": where}
    aggregate, bound_aggregate = policy["aggregate"], bound["aggregate"]
    return normalize(
        {
            "tables": tables,
            "aggregate": {
                "required": aggregate["required"] or bound_aggregate["required"],
                "min_group_size": max(aggregate["min_group_size"], bound_aggregate["min_group_size"]),
                "functions": [
                    name for name in aggregate["functions"] if name in bound_aggregate["functions"]
                ],
            },
            "max_rows": min(policy["max_rows"], bound["max_rows"]),
            "items": {
                "allow": [
                    rule for rule in policy["items"]["allow"] if _rule_covered(rule, bound["items"]["allow"])
                ],
                "redact": _union(bound["items"]["redact"], policy["items"]["redact"], "items.redact"),
            },
            "output": {
                "deny": _union(bound["output"]["deny"], policy["output"]["deny"], "output.deny"),
                "redact": _union(bound["output"]["redact"], policy["output"]["redact"], "output.redact"),
            },
        }
    )
