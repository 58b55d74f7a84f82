"""Property tests on the edit core: output parses, is idempotent, touches nothing else."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hook_sidecar.domain import GUEST_OFF, HOST_OFF, edit_xml
from hook_sidecar.settings import Settings

MODELS = ["virtio", "virtio-transitional", "virtio-non-transitional", "e1000", "rtl8139"]
VIRTIO = set(MODELS[:3])
ATTR_VALUES = st.sampled_from(["on", "off"])


@st.composite
def driver(draw: st.DrawFn, q: str) -> str:
    """'' (none) or a <driver> in one of the shapes seen in the wild."""
    kind = draw(st.sampled_from(["none", "empty", "attrs", "children"]))
    if kind == "none":
        return ""
    attrs = draw(st.sampled_from(["", f" name={q}vhost{q} queues={q}4{q}", f" iommu={q}on{q}"]))
    if kind in ("empty", "attrs"):
        return f"<driver{attrs}/>"
    kids = []
    for tag, keys in (("host", ["csum", "gso", "tso4", "mrg_rxbuf"]),
                      ("guest", ["csum", "tso6", "ecn"])):
        if draw(st.booleans()):
            chosen = draw(st.lists(st.sampled_from(keys), unique=True))
            kids.append(f"<{tag}" + "".join(f" {k}={q}{draw(ATTR_VALUES)}{q}" for k in chosen)
                        + "/>")
    return (f"<driver{attrs}>", kids, "</driver>")  # type: ignore[return-value]


@st.composite
def documents(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, str]]]:
    """A domain in random layout; returns it and [(alias name, model)]."""
    q = draw(st.sampled_from(["'", '"']))
    nl, ind = draw(st.sampled_from([("\n", "\t"), ("\n", "  "), ("\r\n", "\t"), ("", "")]))

    def line(depth: int, text: str) -> str:
        return f"{nl}{ind * depth}{text}" if nl else text

    out = [f"<domain type={q}kvm{q} xmlns:qemu={q}http://libvirt.org/schemas/domain/qemu/1.0{q}>",
           line(1, "<name>vm</name>"), line(1, "<!-- a comment with <interface> inside -->"),
           line(1, "<devices>")]
    ifaces = []
    for i in range(draw(st.integers(0, 5))):
        model = draw(st.sampled_from(MODELS))
        name = draw(st.sampled_from([f"net{i}", f"placeholder-{i}", "default" if i == 0
                                     else f"pod{i:011x}"]))
        ifaces.append((name, model))
        kind = draw(st.sampled_from(["ethernet", "ethernet", "hostdev"])) if i else "ethernet"
        if kind == "hostdev":
            ifaces[-1] = (name, "hostdev")
        children = [f"<target dev={q}tap{i}{q} managed={q}no{q}/>",
                    f"<model type={q}{model}{q}/>",
                    f"<alias name={q}ua-{name}{q}/>", f"<rom enabled={q}no{q}/>"]
        d = draw(driver(q))
        if d:
            if isinstance(d, tuple):
                opening, kids, closing = d
                d = opening + "".join(line(4, k) for k in kids) + line(3, closing)
            children.insert(draw(st.integers(0, len(children))), d)
        order = draw(st.permutations(children))
        out.append(line(2, f"<interface type={q}{kind}{q}>"))
        out += [line(3, c) for c in order]
        out.append(line(2, "</interface>"))
    out += [line(2, f"<hostdev mode={q}subsystem{q}><alias name={q}ua-sriov-x{q}/></hostdev>"),
            line(1, "</devices>"), line(1, "<qemu:commandline>"),
            line(2, f"<qemu:arg value={q}-x{q}/>"), line(1, "</qemu:commandline>"),
            line(0, "</domain>") + nl]
    return "".join(out).encode(), ifaces


@st.composite
def cases(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, str]], Settings]:
    doc, ifaces = draw(documents())
    host, guest = draw(st.booleans()), draw(st.booleans())
    virtio = sorted({n for n, m in ifaces if m in VIRTIO})
    names = draw(st.one_of(st.none(), st.lists(st.sampled_from(virtio), unique=True)
                           if virtio else st.none()))
    return doc, ifaces, Settings(host, guest, tuple(names) if names is not None else None)


def _strip(root: ET.Element, selected: set[str]) -> str:
    """Canonical text of the document with the selected interfaces' <driver> removed."""
    for iface in root.iter("interface"):
        alias = iface.find("alias")
        if alias is not None and alias.get("name", "")[3:] in selected:
            for drv in iface.findall("driver"):
                iface.remove(drv)
    return ET.canonicalize(ET.tostring(root), strip_text=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_edit_properties(case: tuple[bytes, list[tuple[str, str]], Settings]) -> None:
    doc, ifaces, sets = case
    out = edit_xml(doc, sets)
    root = ET.fromstring(out)  # always parses
    assert edit_xml(out, sets) == out  # idempotent, byte for byte
    assert b"ns0" not in out and b"<qemu:arg " in out

    virtio = {n for n, m in ifaces if m in VIRTIO}
    selected = virtio if sets.interfaces is None else set(sets.interfaces) & virtio
    if not sets.changes_anything:
        selected = set()
        assert out == doc
    # nothing outside the selected interfaces' <driver> changed
    assert _strip(ET.fromstring(doc), selected) == _strip(ET.fromstring(out), selected)
    src_root = ET.fromstring(doc)
    for iface, before in zip(root.iter("interface"), src_root.iter("interface"), strict=True):
        name = iface.find("alias").get("name")[3:]  # type: ignore[union-attr]
        drv, old = iface.find("driver"), before.find("driver")
        if name not in selected:
            assert ET.tostring(iface) == ET.tostring(before)
            continue
        assert drv is not None and len(iface.findall("driver")) == 1
        if old is not None:  # driver attributes kept
            assert drv.attrib == old.attrib
        for tag, want, on in (("host", HOST_OFF, sets.host_off),
                              ("guest", GUEST_OFF, sets.guest_off)):
            kids = drv.findall(tag)
            old_kids = [] if old is None else old.findall(tag)
            if on:
                assert len(kids) == max(1, len(old_kids))
                for kid in kids:
                    assert all(kid.get(k) == v for k, v in want)
            else:
                assert [k.attrib for k in kids] == [k.attrib for k in old_kids]
    # untouched interfaces are byte-identical: every line outside edits is found in order
    if doc.count(b"\n") > 3:
        kept = [ln for ln in doc.splitlines() if b"driver" not in ln
                and b"<host" not in ln and b"<guest" not in ln]
        got = [ln for ln in out.splitlines() if b"driver" not in ln
               and b"<host" not in ln and b"<guest" not in ln]
        assert kept == got
