"""The rules format in the SDK (``hivemind_agent.rules``, docs/rules.md): finding the one `policy` block
in Markdown and loading its YAML as JSON data, which the default scope agent and mediator both read."""

from __future__ import annotations

import sys

import pytest

from hivemind_agent.rules import (
    MAX_BLOCK_CHARS,
    RulesError,
    YamlUnavailable,
    fenced_blocks,
    find_policy_block,
    load_policy_block,
)


def test_fenced_blocks_reads_backticks_tildes_tags_and_lines() -> None:
    text = "# Rules\n\n```policy\na: 1\n```\n\n~~~~ yaml extra words\nb: 2\n~~~~\n\n   ```\nplain\n   ```\n"
    blocks = fenced_blocks(text, "rules")
    assert [(b.tag, b.line, b.body) for b in blocks] == [
        ("policy", 3, "a: 1"),
        ("yaml", 7, "b: 2"),
        ("", 11, "plain"),
    ]


def test_a_fence_inside_a_longer_fence_is_body_text() -> None:
    text = "````markdown\n```policy\ntables: {}\n```\n````\n"
    blocks = fenced_blocks(text, "rules")
    assert [block.tag for block in blocks] == ["markdown"]
    assert find_policy_block(text) is None


def test_indented_fence_body_is_dedented_and_four_spaces_is_not_a_fence() -> None:
    blocks = fenced_blocks("  ```policy\n  max_rows: 5\n  ```\n", "rules")
    assert blocks[0].body == "max_rows: 5"
    assert fenced_blocks("    ```policy\n    x\n    ```\n", "rules") == []


def test_inline_backticks_do_not_open_a_fence() -> None:
    assert fenced_blocks("use ```policy``` blocks\n", "rules") == []


def test_an_unclosed_fence_is_an_error_naming_its_line() -> None:
    with pytest.raises(RulesError, match=r"rules line 3: the code fence ``` is never closed"):
        fenced_blocks("a\n\n```policy\nmax_rows: 1\n", "rules")


def test_no_block_means_none() -> None:
    assert find_policy_block("Only aggregates, please.") is None
    assert load_policy_block("Only aggregates, please.", "") is None


def test_the_tag_is_case_insensitive_and_the_block_may_sit_in_the_policy_text() -> None:
    found = find_policy_block("prose only", "```Policy\nmax_rows: 3\n```")
    assert found is not None
    assert (found.source, found.line) == ("policy", 1)


def test_two_blocks_are_refused_with_both_places() -> None:
    rules = "```policy\nmax_rows: 1\n```\n\ntext\n\n```policy\nmax_rows: 2\n```\n"
    with pytest.raises(RulesError, match=r"2 policy blocks \(rules line 1, rules line 7\); keep exactly one"):
        find_policy_block(rules)
    with pytest.raises(RulesError, match=r"rules line 1, policy line 1"):
        find_policy_block("```policy\na: 1\n```", "```policy\nb: 2\n```")


def test_yaml_and_json_bodies_load_as_mappings() -> None:
    block, data = load_policy_block("```policy\ntables:\n  t:\n    columns: [a]\n```") or (None, None)
    assert block is not None and data == {"tables": {"t": {"columns": ["a"]}}}
    _, data = load_policy_block('```policy\n{"max_rows": 5}\n```') or (None, None)
    assert data == {"max_rows": 5}


def test_invalid_yaml_names_the_line_in_the_rules() -> None:
    rules = "# Rules\n\n```policy\ntables:\n  t: [a\n```\n"
    with pytest.raises(RulesError, match=r"^rules line \d+: the policy block is not valid YAML"):
        load_policy_block(rules)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("", "the policy block is empty"),
        ("- a\n- b", "must be a mapping"),
        ("just words", "must be a mapping"),
        ("[" * 5000 + "]" * 5000, "nested too deeply|not valid YAML"),
        ("a: " + "x" * MAX_BLOCK_CHARS, "longer than"),
    ],
)
def test_unusable_blocks_are_refused(body: str, message: str) -> None:
    with pytest.raises(RulesError, match=message):
        load_policy_block(f"```policy\n{body}\n```\n")


def test_yaml_tags_that_build_objects_are_refused() -> None:
    with pytest.raises(RulesError, match="not valid YAML"):
        load_policy_block("```policy\nx: !!python/object/apply:os.system ['true']\n```")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("created: 2024-01-01", r"holds a date at created, which a JSON policy cannot carry"),
        ("items:\n  allow: [{meta: {day: 2024-01-01}}]", r"a date at items\.allow\[0\]\.meta\.day"),
        ("output: {deny: !!binary aGk=}", r"a bytes at output\.deny"),
        ("tables: {1: {columns: [a]}}", r"the non-text key 1 at tables"),
        ("max_rows: .inf", r"the number inf at max_rows"),
        ("output: {deny: !!set {a: null}}", r"a set at output\.deny"),
        (
            "a: &x [p, q]\nb: [*x, *x, *x]",
            r"rules line 1: the policy block holds a YAML alias at b\[\d\]",
        ),
    ],
)
def test_values_json_cannot_carry_and_aliases_are_refused(body: str, message: str) -> None:
    with pytest.raises(RulesError, match=message):
        load_policy_block(f"```policy\n{body}\n```\n")


def test_the_two_yaml_conveniences_apply_where_the_shape_is_expected() -> None:
    _, data = load_policy_block(
        "```policy\naggregate:\n  functions: [count, Avg, 7]\nitems:\n  allow:\n"
        "    - meta: {year: 2024, kind: memo, draft: true}\n    - id: item_a1\n```"
    ) or (None, None)
    assert data == {
        "aggregate": {"functions": ["COUNT", "AVG", 7]},
        "items": {"allow": [{"meta": {"year": "2024", "kind": "memo", "draft": True}}, {"id": "item_a1"}]},
    }
    # Anything else stays as written, for the runner to judge.
    _, data = load_policy_block("```policy\naggregate: [count]\nitems: {allow: memo}\n```") or (None, None)
    assert data == {"aggregate": ["count"], "items": {"allow": "memo"}}


def test_without_pyyaml_finding_works_and_loading_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # makes `import yaml` raise ImportError
    assert find_policy_block("```policy\nmax_rows: 1\n```") is not None
    assert load_policy_block("no block here") is None
    with pytest.raises(YamlUnavailable, match=r"needs PyYAML.*python3-yaml") as caught:
        load_policy_block("```policy\nmax_rows: 1\n```")
    assert isinstance(caught.value, ImportError)
