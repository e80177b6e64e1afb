"""RFC 8785 canonical JSON and the no-floats rule for signed documents."""

import pytest

from hivemind.canonical import canonical_json, canonical_sha256
from hivemind.errors import FloatInSignedDocument
from hivemind.models import Budgets


def test_rfc8785_key_ordering_and_escaping() -> None:
    # RFC 8785 section 3.2.3: keys sort by UTF-16 code units, not by code points.
    value = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    expected = (
        '{"\\r":"Carriage Return","1":"One","\u0080":"Control",'
        '"\u00f6":"Latin Small Letter O With Diaeresis",'
        '"\u20ac":"Euro Sign","\U0001f600":"Emoji: Grinning Face","\ufb33":"Hebrew Letter Dalet With Dagesh"}'
    )
    assert canonical_json(value) == expected.encode()


def test_whitespace_and_literals() -> None:
    assert (
        canonical_json({"b": [True, None, False], "a": "x\u001fy"})
        == b'{"a":"x\\u001fy","b":[true,null,false]}'
    )


def test_floats_are_refused_with_their_path() -> None:
    with pytest.raises(FloatInSignedDocument, match=r"\$\.a\[1\]\.b"):
        canonical_json({"a": [1, {"b": 0.5}]})


def test_models_hash_independently_of_field_order() -> None:
    budgets = Budgets(timeout_s=1, llm_calls=2, tokens=3, memory_mb=64)
    same = {"tokens": 3, "memory_mb": 64, "llm_calls": 2, "timeout_s": 1}
    assert canonical_sha256(budgets) == canonical_sha256(same)
