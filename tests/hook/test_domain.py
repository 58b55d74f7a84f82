"""The domain XML edit core (pure, standard library), on KubeVirt-format fixtures."""

from __future__ import annotations

import pytest

from hook_sidecar.domain import HookInputError, edit_domain, edit_xml
from hook_sidecar.settings import Settings

from .conftest import GUEST_OFF, HOST_OFF, domain, offload, vmi_json, without_driver_lines

NEW_DRIVER = (
    b"\t\t\t<model type='virtio-non-transitional'/>\n"
    b"\t\t\t<driver>\n"
    b"\t\t\t\t<host csum='off' gso='off' tso4='off' tso6='off' ecn='off' ufo='off'/>\n"
    b"\t\t\t\t<guest csum='off' tso4='off' tso6='off' ecn='off' ufo='off'/>\n"
    b"\t\t\t</driver>\n"
    b"\t\t\t<mac address='02:00:00:00:00:01'/>\n"
)


def test_single_interface_gets_a_tab_indented_driver() -> None:
    src = domain("single")
    out = edit_domain(src, vmi_json())
    assert NEW_DRIVER in out
    assert offload(out, "default") == ({}, HOST_OFF, GUEST_OFF)
    assert without_driver_lines(out) == src.splitlines()
    # the rest is byte for byte: prefixes, comments, metadata, entities as written
    assert out.count(b"<qemu:arg value='-fw_cfg'/>") == 1
    assert b"xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'" in out
    assert b"<!-- KubeVirt-style devices: keep this comment -->" in out
    assert b"string=a&amp;b" in out
    assert b"ns0:" not in out


def test_multiqueue_driver_keeps_its_attributes() -> None:
    out = edit_domain(domain("multiqueue"), vmi_json())
    assert offload(out, "default") == ({"name": "vhost", "queues": "4"}, HOST_OFF, GUEST_OFF)
    assert (b"\t\t\t<driver name='vhost' queues='4'>\n\t\t\t\t<host csum='off'" in out)
    assert without_driver_lines(out) == without_driver_lines(domain("multiqueue"))


def test_go_style_document_keeps_its_style() -> None:
    """KubeVirt's Go encoder writes double quotes and explicit end tags."""
    src = domain("gostyle")
    out = edit_domain(src, vmi_json(ifaces=["default"]))
    assert (b'\t\t\t<driver name="vhost" queues="2">\n'
            b'\t\t\t\t<host csum="off" gso="off" tso4="off" tso6="off" ecn="off" ufo="off"/>\n'
            b'\t\t\t\t<guest csum="off" tso4="off" tso6="off" ecn="off" ufo="off"/>\n'
            b"\t\t\t</driver>\n") in out
    assert without_driver_lines(out) == without_driver_lines(src)


def test_every_virtio_model_is_edited_by_default() -> None:
    out = edit_domain(domain("multus"), vmi_json())
    for name in ("default", "blue", "red"):  # virtio-non-transitional, virtio, -transitional
        assert offload(out, name) == ({}, HOST_OFF, GUEST_OFF), name


def test_placeholder_interfaces_are_edited_by_default() -> None:
    out = edit_domain(domain("placeholder"), vmi_json())
    assert offload(out, "placeholder-0") == ({}, HOST_OFF, GUEST_OFF)


def test_non_virtio_and_sriov_are_left_alone_by_default() -> None:
    src = domain("mixed")
    out = edit_domain(src, vmi_json())
    assert offload(out, "default") == ({}, HOST_OFF, GUEST_OFF)
    assert offload(out, "legacy") == (None, None, None)
    assert offload(out, "vf") == (None, None, None)
    assert out.count(b"<driver>") == 1
    hostdev = src[src.index(b"\t\t<hostdev"):src.index(b"</hostdev>")]
    assert hostdev in out


@pytest.mark.parametrize(("name", "words"), [
    ("legacy", "model 'e1000'"),
    ("vf", "SR-IOV"),
    ("sriovnet", "SR-IOV"),
])
def test_asking_for_a_non_virtio_interface_is_an_error(name: str, words: str) -> None:
    annotations = {"netaccel.kubevirt.io/interfaces": f"default,{name}"}
    with pytest.raises(HookInputError, match=words) as err:
        edit_domain(domain("mixed"), vmi_json(annotations))
    assert repr(name) in str(err.value) and "virtio" in str(err.value)


def test_domain_side_check_catches_non_virtio_unknown_to_the_vmi_spec() -> None:
    """The VMI spec says virtio, the domain says e1000: the domain wins."""
    annotations = {"netaccel.kubevirt.io/interfaces": "legacy"}
    spec = vmi_json(annotations, ifaces=["default"])
    body = spec.replace(b'"name": "default"', b'"name": "legacy"')
    with pytest.raises(HookInputError, match="model 'e1000', not virtio"):
        edit_domain(domain("mixed"), body)


def test_explicit_selection_edits_only_those() -> None:
    out = edit_domain(domain("multus"),
                      vmi_json({"netaccel.kubevirt.io/interfaces": " blue , red"}))
    assert offload(out, "default") == (None, None, None)
    assert offload(out, "blue") == ({}, HOST_OFF, GUEST_OFF)
    assert offload(out, "red") == ({}, HOST_OFF, GUEST_OFF)


def test_selected_but_not_plugged_yet_is_skipped() -> None:
    out = edit_domain(domain("single"),
                      vmi_json({"netaccel.kubevirt.io/interfaces": "default,blue"}))
    assert offload(out, "default") == ({}, HOST_OFF, GUEST_OFF)


@pytest.mark.parametrize(("mode", "host", "guest"), [
    ("off", HOST_OFF, GUEST_OFF), ("host-off", HOST_OFF, None), ("guest-off", None, GUEST_OFF)])
def test_offload_modes(mode: str, host: dict | None, guest: dict | None) -> None:
    out = edit_domain(domain("single"), vmi_json({"netaccel.kubevirt.io/checksum-offload": mode}))
    assert offload(out, "default") == ({}, host, guest)


def test_mode_on_passes_the_domain_through_unchanged() -> None:
    src = domain("multus")
    assert edit_domain(src, vmi_json({"netaccel.kubevirt.io/checksum-offload": "on"})) == src


def test_existing_children_are_updated_not_duplicated() -> None:
    src = domain("multiqueue").replace(
        b"<driver name='vhost' queues='4'/>",
        b"<driver name='vhost' queues='4'>\n\t\t\t\t<host csum='on' mrg_rxbuf='off'/>\n"
        b"\t\t\t</driver>")
    out = edit_domain(src, vmi_json())
    assert out.count(b"<host ") == 1 and out.count(b"<guest ") == 1
    assert offload(out, "default") == ({"name": "vhost", "queues": "4"},
                                       {**HOST_OFF, "mrg_rxbuf": "off"}, GUEST_OFF)
    assert (b"\t\t\t\t<host csum='off' mrg_rxbuf='off' gso='off' tso4='off' tso6='off' "
            b"ecn='off' ufo='off'/>\n\t\t\t\t<guest csum='off'") in out


@pytest.mark.parametrize("name", ["single", "multiqueue", "multus", "placeholder", "mixed",
                                  "gostyle"])
def test_idempotent_byte_for_byte(name: str) -> None:
    once = edit_domain(domain(name), vmi_json())
    assert once != domain(name)
    assert edit_domain(once, vmi_json()) == once


def test_redefinition_from_a_copy_without_our_children_gets_them_back() -> None:
    """KubeVirt's hot-plug redefinition drops unknown <driver> children: reapply."""
    once = edit_domain(domain("multiqueue"), vmi_json())
    dropped = b"\n".join(line for line in once.split(b"\n")
                         if b"<host " not in line and b"<guest " not in line)
    assert edit_domain(dropped, vmi_json()) == once


def test_compact_and_crlf_documents() -> None:
    compact = (b"<domain><devices><interface type='ethernet'><model type='virtio'/>"
               b"<alias name='ua-default'/></interface></devices></domain>")
    out = edit_xml(compact, Settings())
    assert out == (b"<domain><devices><interface type='ethernet'><model type='virtio'/>"
                   b"<driver><host csum='off' gso='off' tso4='off' tso6='off' ecn='off' "
                   b"ufo='off'/><guest csum='off' tso4='off' tso6='off' ecn='off' ufo='off'/>"
                   b"</driver><alias name='ua-default'/></interface></devices></domain>")
    crlf = domain("single").replace(b"\n", b"\r\n")
    out = edit_xml(crlf, Settings())
    assert b"\r\n\t\t\t<driver>\r\n\t\t\t\t<host " in out and b"\n\t" not in out.replace(
        b"\r\n", b"")
    assert edit_xml(out, Settings()) == out


def test_spaces_indentation_is_copied() -> None:
    src = domain("single").replace(b"\t", b"  ")
    out = edit_xml(src, Settings())
    assert b"\n      <model type='virtio-non-transitional'/>\n      <driver>\n        <host " in out
