"""The policy block of a room's rules (docs/rules.md): find the one fenced ``policy`` block, load it.

A room's rules are Markdown for humans. They may hold exactly one fenced code block whose info string
starts with ``policy``; its body is a ScopePolicy written in YAML (JSON is valid YAML too). The
manifest carries two texts, ``rules`` and ``policy``: both are searched, and together they may hold at
most one policy block.

Finding blocks is standard library only. Loading a block's YAML needs PyYAML, which the agent base
image provides (``python3-yaml``); it is imported only when a block is loaded, so the SDK itself stays
dependency-free, and without PyYAML :func:`load_policy_block` raises :class:`YamlUnavailable`.

This module reads the format, it does not judge the policy: whether a loaded block is a valid
ScopePolicy for the room's data, and how it compares with another policy, is the runner's call
(``Bridge.check_policy``, the same code the runner applies to the policy a scope stage posts).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

POLICY_TAG = "policy"
# A policy is a few dozen lines; a bound keeps a hostile rules text from costing real time in YAML.
MAX_BLOCK_CHARS = 64 * 1024

# CommonMark fences: at most three spaces of indentation, then three or more backticks or tildes.
_FENCE_OPEN = re.compile(r"^( {0,3})(`{3,}|~{3,})[ \t]*([^\n]*)$")


class RulesError(ValueError):
    """The rules text breaks the rules format. The message names the text, the line and the problem."""


class YamlUnavailable(ImportError):
    """PyYAML is not installed, so a policy block cannot be loaded (the agent base image has it)."""


@dataclass(frozen=True, slots=True)
class FencedBlock:
    """One fenced code block: which manifest text it is in, its opening line (1-based), tag and body."""

    source: str
    line: int
    tag: str
    body: str

    @property
    def where(self) -> str:
        return f"{self.source} line {self.line}"


def _strip_indent(line: str, indent: int) -> str:
    removable = len(line) - len(line.lstrip(" "))
    return line[min(indent, removable) :]


def fenced_blocks(text: str, source: str) -> list[FencedBlock]:
    """Every fenced code block of a Markdown text, in order. An unclosed fence is a :class:`RulesError`.

    Fences inside other fences are body text, so a rules file can show an example policy block inside
    a longer fence without it counting as the room's block.
    """
    lines = text.splitlines()
    blocks: list[FencedBlock] = []
    index = 0
    while index < len(lines):
        opening = _FENCE_OPEN.match(lines[index])
        # A backtick fence's info string cannot contain backticks (that is inline code, not a fence).
        if opening is None or (opening.group(2)[0] == "`" and "`" in opening.group(3)):
            index += 1
            continue
        indent, fence, info = len(opening.group(1)), opening.group(2), opening.group(3).strip()
        closing = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        end = index + 1
        while end < len(lines) and not closing.match(lines[end]):
            end += 1
        if end == len(lines):
            raise RulesError(f"{source} line {index + 1}: the code fence {fence} is never closed")
        tag = info.split()[0].lower() if info else ""
        body = "\n".join(_strip_indent(line, indent) for line in lines[index + 1 : end])
        blocks.append(FencedBlock(source=source, line=index + 1, tag=tag, body=body))
        index = end + 1
    return blocks


def find_policy_block(rules: str, policy: str = "") -> FencedBlock | None:
    """The one `policy` block of the room's texts, or None. Two or more is a :class:`RulesError`."""
    found = [
        block
        for source, text in (("rules", rules), ("policy", policy))
        for block in fenced_blocks(text, source)
        if block.tag == POLICY_TAG
    ]
    if len(found) > 1:
        places = ", ".join(block.where for block in found)
        raise RulesError(f"the room's texts hold {len(found)} policy blocks ({places}); keep exactly one")
    return found[0] if found else None


def _not_json(data: Any) -> str | None:
    """Where ``data`` holds something JSON cannot carry, or a YAML alias; None when it is plain JSON."""
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(data, "the top level")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict | list):
            # PyYAML builds an alias (*name) as the same object again: refused, because a few nested
            # aliases expand to more values than any policy has (and no policy needs one).
            if id(value) in seen:
                return f"a YAML alias at {path}"
            seen.add(id(value))
            if isinstance(value, list):
                stack += [(item, f"{path}[{index}]") for index, item in enumerate(value)]
                continue
            for key, item in value.items():
                if not isinstance(key, str):
                    return f"the non-text key {key!r} at {path}"
                stack.append((item, key if path == "the top level" else f"{path}.{key}"))
        elif isinstance(value, float) and not math.isfinite(value):
            return f"the number {value} at {path}"
        elif value is not None and not isinstance(value, str | int | float | bool):
            return f"a {type(value).__name__} at {path}"
    return None


def _meta_as_text(rule: Any) -> Any:
    if not (isinstance(rule, dict) and isinstance(rule.get("meta"), dict)):
        return rule
    meta = {
        key: str(value) if isinstance(value, int) and not isinstance(value, bool) else value
        for key, value in rule["meta"].items()
    }
    return {**rule, "meta": meta}


def _with_conveniences(data: dict[str, Any]) -> dict[str, Any]:
    """The format's two conveniences (docs/rules.md), applied only where the shape is as expected:
    aggregate function names in any case, and integer item metadata values as the text they look like.
    Anything else is left as written, for the runner to judge."""
    result = dict(data)
    aggregate = result.get("aggregate")
    if isinstance(aggregate, dict) and isinstance(aggregate.get("functions"), list):
        functions = [name.upper() if isinstance(name, str) else name for name in aggregate["functions"]]
        result["aggregate"] = {**aggregate, "functions": functions}
    items = result.get("items")
    if isinstance(items, dict) and isinstance(items.get("allow"), list):
        result["items"] = {**items, "allow": [_meta_as_text(rule) for rule in items["allow"]]}
    return result


def _yaml() -> Any:
    try:
        import yaml  # noqa: PLC0415  (optional: only loading a block needs it)
    except ImportError:
        raise YamlUnavailable(
            "loading a rules policy block needs PyYAML: the Hivemind agent base image ships it "
            "(python3-yaml); elsewhere install it (pip install 'hivemind-agent[rules]')"
        ) from None
    return yaml


def load_policy_block(rules: str, policy: str = "") -> tuple[FencedBlock, dict[str, Any]] | None:
    """The policy block and its ScopePolicy as JSON data, or None when there is no block.

    The data is the block's YAML, which must be plain JSON values (no dates, binary, sets, non-text
    keys or aliases), with the format's two conveniences applied. Raises :class:`RulesError` for two
    blocks, an oversized or empty block, YAML that does not parse or is not a mapping of JSON values;
    :class:`YamlUnavailable` when PyYAML is missing.
    """
    block = find_policy_block(rules, policy)
    if block is None:
        return None
    if len(block.body) > MAX_BLOCK_CHARS:
        raise RulesError(f"{block.where}: the policy block is longer than {MAX_BLOCK_CHARS} characters")
    if not block.body.strip():
        raise RulesError(f"{block.where}: the policy block is empty (write {{}} for the strictest policy)")
    yaml = _yaml()
    try:
        data = yaml.safe_load(block.body)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = block.line + 1 + mark.line if mark is not None else block.line
        raise RulesError(
            f"{block.source} line {line}: the policy block is not valid YAML ({exc.problem or exc})"
        ) from None
    except yaml.YAMLError as exc:
        raise RulesError(f"{block.where}: the policy block is not valid YAML ({exc})") from None
    except RecursionError:
        raise RulesError(f"{block.where}: the policy block is nested too deeply") from None
    if not isinstance(data, dict):
        raise RulesError(
            f"{block.where}: the policy block must be a mapping (tables:, aggregate:, ...), "
            f"not {type(data).__name__}"
        )
    problem = _not_json(data)
    if problem is not None:
        raise RulesError(f"{block.where}: the policy block holds {problem}, which a JSON policy cannot carry")
    return block, _with_conveniences(data)
