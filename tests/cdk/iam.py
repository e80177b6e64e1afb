"""Read IAM statements out of a synthesized template, with references rendered as readable strings.

``<Logical.Arn>`` is ``Fn::GetAtt [Logical, Arn]``, ``<Logical>`` is ``Ref Logical``; ``Fn::Join`` is
concatenated. So a bucket object pattern reads ``<StorageBlobs1234.Arn>/rooms/*/*``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any


def render(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if "Ref" in value:
            return f"<{value['Ref']}>"
        if "Fn::GetAtt" in value:
            logical, attribute = value["Fn::GetAtt"]
            return f"<{logical}.{attribute}>"
        if "Fn::Join" in value:
            separator, parts = value["Fn::Join"]
            return separator.join(render(part) for part in parts)
        if "Fn::Sub" in value:
            return str(value["Fn::Sub"])
    raise AssertionError(f"cannot render {value!r}")


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def role_statements(template: dict[str, Any], role_logical_id: str) -> list[dict[str, Any]]:
    """Every identity-policy statement attached to a role (its AWS::IAM::Policy and inline policies)."""
    statements: list[dict[str, Any]] = []
    for resource in template["Resources"].values():
        properties = resource.get("Properties", {})
        if resource["Type"] == "AWS::IAM::Policy" and {"Ref": role_logical_id} in properties.get("Roles", []):
            statements += properties["PolicyDocument"]["Statement"]
    role = template["Resources"][role_logical_id]["Properties"]
    for inline in role.get("Policies", []):
        statements += inline["PolicyDocument"]["Statement"]
    return statements


def grants(statements: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Rendered resource -> allowed actions (Allow statements only; conditions noted separately)."""
    result: dict[str, set[str]] = defaultdict(set)
    for statement in statements:
        assert statement["Effect"] == "Allow", statement
        for resource in as_list(statement["Resource"]):
            result[render(resource)] |= set(as_list(statement["Action"]))
    return dict(result)


def identity_statements(template: dict[str, Any]) -> list[dict[str, Any]]:
    """Every statement of every identity policy in the template."""
    statements: list[dict[str, Any]] = []
    for resource in template["Resources"].values():
        properties = resource.get("Properties", {})
        if resource["Type"] in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
            statements += properties["PolicyDocument"]["Statement"]
        if resource["Type"] == "AWS::IAM::Role":
            for inline in properties.get("Policies", []):
                statements += inline["PolicyDocument"]["Statement"]
    return statements
