"""The policy block of a room's rules (docs/rules.md): find the one fenced `policy` block, load its YAML.

A room's rules are Markdown for humans. They may hold exactly one fenced code block whose info string
starts with ``policy``; its body is a ScopePolicy written in YAML (JSON is valid YAML too). The
manifest carries two texts, ``rules`` and ``policy``: both are searched, and together they may hold at
most one policy block.

Shared by default-scope and default-mediator. Each agent directory is its own image build context, so
the file is copied into both; tests/agents/test_rules_block.py checks that the copies are identical.
Standard library and PyYAML only (the agent base image provides both).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

POLICY_TAG = "policy"
# A policy is a few dozen lines; a bound keeps a hostile rules text from costing real time in YAML.
MAX_BLOCK_CHARS = 64 * 1024

# CommonMark fences: at most three spaces of indentation, then three or more backticks or tildes.
_FENCE_OPEN = re.compile(r"^( {0,3})(`{3,}|~{3,})[ \t]*([^\n]*)$")


class RulesError(ValueError):
    """The rules text breaks the rules format. The message names the text, the line and the problem."""


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


def load_policy_block(rules: str, policy: str = "") -> tuple[FencedBlock, dict[str, Any]] | None:
    """The policy block and its YAML as a mapping, or None when there is no block.

    Raises :class:`RulesError` for two blocks, an oversized or empty block, YAML that does not parse,
    or YAML whose top level is not a mapping.
    """
    block = find_policy_block(rules, policy)
    if block is None:
        return None
    if len(block.body) > MAX_BLOCK_CHARS:
        raise RulesError(f"{block.where}: the policy block is longer than {MAX_BLOCK_CHARS} characters")
    if not block.body.strip():
        raise RulesError(f"{block.where}: the policy block is empty (write {{}} for the strictest policy)")
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
    return block, data
