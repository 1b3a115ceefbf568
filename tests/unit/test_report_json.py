"""The text `safeusb inspect` prints from safeusbd's answer is the text it prints from
findings read here: for every tree recorded on the real kernel, through the protocol's
encoding; an answer that is not an inspect object is not shown."""

from __future__ import annotations

import pytest

from safeusb.inspect.report import as_json, as_text
from safeusb.safeusbd import protocol
from safeusb.textout import text_of_json
from tests.unit.test_fixtures import NAMES, findings


@pytest.mark.parametrize("name", NAMES)
def test_text_from_the_answer_is_the_text_from_the_findings(name: str) -> None:
    f = findings(name)
    wire = protocol.strict_loads(protocol.ok_reply("x", as_json(f))[:-1])["result"]
    assert wire == as_json(f)
    assert text_of_json(wire) == as_text(f)


@pytest.mark.parametrize("doc", [
    {}, {"target": "x", "free": True, "notes": [], "warnings": []},
    {"target": "x", "free": True, "notes": [], "warnings": [], "reasons": [{"text": "r"}]},
    {"target": "x", "free": "yes", "notes": [], "warnings": [], "reasons": []},
    {"target": 1, "free": True, "notes": [], "warnings": [], "reasons": []},
    {"target": "x", "free": True, "notes": [2], "warnings": [], "reasons": []},
    {"target": "x", "free": False, "notes": [], "warnings": [], "reasons": [{"kind": "m"}]},
    {"target": "x", "free": False, "notes": [], "warnings": [], "reasons": "abc"},
])
def test_not_an_inspect_object(doc: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError):
        text_of_json(doc)
