"""Annotations -> Settings: defaults, every allowed value, and errors that say what to do."""

from __future__ import annotations

import pytest

from hook_sidecar.settings import (
    ANNOTATION_INTERFACES,
    ANNOTATION_OFFLOAD,
    HookInputError,
    Settings,
    load_vmi,
    settings_from_json,
    vmi_ident,
)

from .conftest import vmi, vmi_json


def test_default_is_offload_off_both_sides_all_virtio() -> None:
    assert settings_from_json(vmi_json()) == Settings(True, True, None)
    assert settings_from_json(b'{"metadata": {}}') == Settings(True, True, None)


@pytest.mark.parametrize(("value", "expected"), [
    ("off", Settings(True, True)), ("host-off", Settings(True, False)),
    ("guest-off", Settings(False, True)), ("on", Settings(False, False)),
    (" off ", Settings(True, True))])
def test_offload_values(value: str, expected: Settings) -> None:
    assert settings_from_json(vmi_json({ANNOTATION_OFFLOAD: value})) == expected


@pytest.mark.parametrize("value", ["OFF", "false", "", "both"])
def test_unknown_offload_value_lists_the_allowed_ones(value: str) -> None:
    with pytest.raises(HookInputError) as err:
        settings_from_json(vmi_json({ANNOTATION_OFFLOAD: value}))
    msg = str(err.value)
    assert ANNOTATION_OFFLOAD in msg and repr(value) in msg
    assert "off, host-off, guest-off, on" in msg


def test_interfaces_annotation() -> None:
    got = settings_from_json(vmi_json({ANNOTATION_INTERFACES: "blue, default,blue"}))
    assert got.interfaces == ("blue", "default")


@pytest.mark.parametrize(("value", "words"), [
    ("default,nosuch", "'nosuch', which the VMI does not have (its interfaces: blue, default"),
    (" , ", "is empty"),
    ("legacy", "model 'e1000', not virtio"),
    ("sriovnet", "SR-IOV"),
])
def test_interfaces_annotation_errors(value: str, words: str) -> None:
    with pytest.raises(HookInputError, match=words.replace("(", r"\(")):
        settings_from_json(vmi_json({ANNOTATION_INTERFACES: value}))


@pytest.mark.parametrize(("body", "words"), [
    (b"", "empty"),
    (b"{not json", "malformed"),
    (b"[1, 2]", "must be an object, got list"),
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b'{"metadata": {"annotations": []}}', "metadata.annotations must be an object"),
    (b'{"spec": {"domain": {"devices": {"interfaces": {}}}}, "metadata": {"annotations": '
     b'{"netaccel.kubevirt.io/interfaces": "a"}}}', "interfaces must be a list"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
])
def test_bad_vmi_json(body: bytes, words: str) -> None:
    with pytest.raises(HookInputError, match=words):
        settings_from_json(body)


def test_vmi_ident_never_raises() -> None:
    assert vmi_ident(vmi(namespace="ns1", name="vm1")) == "ns1/vm1"
    assert vmi_ident({"metadata": "x"}) == "?/?"
    assert vmi_ident(load_vmi(b'{"metadata": {"name": "a"}}')) == "?/a"
