"""The domain XML edit: virtio-net checksum offload off (standard library only, pure).

The edit is done by splicing the original bytes: expat parses the document (and refuses
DTDs, so no entity tricks), records where each ``<interface>`` and its children start and
end, and only the few tags that must change are rewritten or inserted. Everything else -
namespace prefixes (``qemu:``), comments, metadata, attribute quoting, element order,
indentation - stays byte for byte as it came. A tag that already says what we want is left
alone, which makes the edit idempotent: ``edit(edit(x)) == edit(x)``.

New elements copy the surrounding style: a new ``<driver>`` is indented like its siblings
(tabs in KubeVirt's XML) and uses the quote character of the ``<interface>`` tag.
"""

from __future__ import annotations

import re
import xml.parsers.expat
from dataclasses import dataclass, field

from hook_sidecar.errors import HookInputError
from hook_sidecar.settings import VIRTIO_MODELS, Settings, load_vmi, settings_from_vmi, vmi_ident

__all__ = ["HookInputError", "MAX_DOMAIN_BYTES", "edit_domain", "edit_xml", "on_define_domain",
           "HOST_OFF", "GUEST_OFF"]

MAX_DOMAIN_BYTES = 16 * 1024 * 1024
ALIAS_PREFIX = "ua-"
#: ``<driver>`` children and the attributes they get, in this order.
HOST_OFF = (("csum", "off"), ("gso", "off"), ("tso4", "off"), ("tso6", "off"),
            ("ecn", "off"), ("ufo", "off"))
GUEST_OFF = (("csum", "off"), ("tso4", "off"), ("tso6", "off"), ("ecn", "off"), ("ufo", "off"))

_TAG_NAME = re.compile(rb"<([^\s/>]+)")
_ATTR = re.compile(rb"\s+([^\s=/>]+)\s*=\s*(?:\"([^\"]*)\"|'([^']*)')")
_TAG_END = re.compile(rb"\s*(/?)>")
_WHOLE_TAG = re.compile(rb"<[^\s/>]+(?:\s+[^\s=/>]+\s*=\s*(?:\"[^\"]*\"|'[^']*'))*\s*(/?)>")
_XML_DECL_ENC = re.compile(rb"^(?:\xef\xbb\xbf)?<\?xml[^>]*?encoding\s*=\s*[\"']([^\"']+)")


@dataclass
class _Attr:
    name: str
    quote: bytes
    raw: bytes  # the value as written, still escaped

    def render(self) -> bytes:
        return b" " + self.name.encode() + b"=" + self.quote + self.raw + self.quote


@dataclass
class _Node:
    """An element of an ``<interface>`` / ``<hostdev>`` subtree, with byte offsets."""

    name: str
    attrs: dict[str, str]
    start: int  # offset of '<'
    start_end: int = 0  # offset just past the start tag
    end: int = 0  # offset just past the whole element
    close_start: int | None = None  # offset of '</name>', None when self-closing
    children: list[_Node] = field(default_factory=list)

    def child(self, name: str) -> _Node | None:
        return next((c for c in self.children if c.name == name), None)

    def child_attr(self, name: str, attr: str) -> str | None:
        node = self.child(name)
        return None if node is None else node.attrs.get(attr)


class _Tag:
    """A start tag re-read from the raw bytes (expat gives no offsets past its '<')."""

    def __init__(self, data: bytes, pos: int) -> None:
        m = _TAG_NAME.match(data, pos)
        if m is None:  # cannot happen: expat reported an element here
            raise HookInputError(f"domain XML: no tag at byte {pos}")
        self.name = m.group(1)
        self.attrs: list[_Attr] = []
        i = m.end()
        while True:
            a = _ATTR.match(data, i)
            if a is None:
                break
            quote = b'"' if a.group(2) is not None else b"'"
            raw = a.group(2) if a.group(2) is not None else a.group(3)
            self.attrs.append(_Attr(a.group(1).decode(), quote, raw))
            i = a.end()
        e = _TAG_END.match(data, i)
        if e is None:
            raise HookInputError(f"domain XML: cannot read the tag at byte {pos}")
        self.self_closing = bool(e.group(1))
        self.end = e.end()

    def render(self, close: bool) -> bytes:
        return b"<" + self.name + b"".join(a.render() for a in self.attrs) + (
            b"/>" if close else b">")


@dataclass
class _Parsed:
    root: str
    interfaces: list[_Node]
    hostdevs: list[_Node]


def _check_bytes(data: bytes) -> None:
    if not isinstance(data, (bytes, bytearray)):
        raise HookInputError(f"domain XML must be bytes, got {type(data).__name__}")
    if len(data) > MAX_DOMAIN_BYTES:
        raise HookInputError(
            f"domain XML is {len(data)} bytes, more than the limit of {MAX_DOMAIN_BYTES} "
            f"bytes ({MAX_DOMAIN_BYTES // (1024 * 1024)} MiB)"
        )
    if not data.strip():
        raise HookInputError("domain XML is empty")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HookInputError(
            f"domain XML is not valid UTF-8: byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start} ({exc.reason}); only UTF-8 is accepted"
        ) from None
    m = _XML_DECL_ENC.match(data)
    if m and m.group(1).decode("ascii", "replace").lower() not in ("utf-8", "utf8"):
        raise HookInputError(
            f"domain XML declares encoding {m.group(1).decode('ascii', 'replace')!r}; "
            "only UTF-8 is accepted"
        )


def _refuse_dtd(*_args: object) -> None:
    raise HookInputError(
        "domain XML contains a DOCTYPE or entity declaration; these are refused "
        "(entity expansion attacks) and libvirt domains never need them"
    )


def _parse(data: bytes) -> _Parsed:
    """Parse with expat; collect ``/domain/devices/interface`` and ``hostdev`` subtrees."""
    _check_bytes(data)
    parser = xml.parsers.expat.ParserCreate("UTF-8")
    parser.SetParamEntityParsing(xml.parsers.expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _refuse_dtd
    parser.EntityDeclHandler = _refuse_dtd
    parser.UnparsedEntityDeclHandler = _refuse_dtd
    parser.ExternalEntityRefHandler = _refuse_dtd

    path: list[str] = []
    stack: list[_Node] = []  # open nodes of the subtree being collected
    parsed = _Parsed(root="", interfaces=[], hostdevs=[])

    def start(name: str, attrs: dict[str, str]) -> None:
        if not path:
            parsed.root = name
        depth = len(path)
        path.append(name)
        collect = bool(stack) or (
            depth == 2 and path[1] == "devices" and name in ("interface", "hostdev"))
        if not collect:
            return
        pos = parser.CurrentByteIndex
        tag = _WHOLE_TAG.match(data, pos)
        if tag is None:  # cannot happen: expat reported a start tag here
            raise HookInputError(f"domain XML: cannot read the tag at byte {pos}")
        node = _Node(name, attrs, pos, tag.end())
        if tag.group(1):
            node.end = tag.end()
        if stack:
            stack[-1].children.append(node)
        elif name == "interface":
            parsed.interfaces.append(node)
        else:
            parsed.hostdevs.append(node)
        stack.append(node)

    def end(name: str) -> None:
        path.pop()
        if not stack or len(path) != 2 + len(stack) - 1:
            return
        node = stack.pop()
        if node.end == 0:  # not self-closing: expat points at '</name>'
            node.close_start = parser.CurrentByteIndex
            node.end = data.index(b">", node.close_start) + 1

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    try:
        parser.Parse(data, True)
    except xml.parsers.expat.ExpatError as exc:
        code = exc.code
        hint = ""
        if code in (xml.parsers.expat.errors.codes[xml.parsers.expat.errors.XML_ERROR_NO_ELEMENTS],
                    xml.parsers.expat.errors.codes[
                        xml.parsers.expat.errors.XML_ERROR_UNCLOSED_TOKEN]):
            hint = " (truncated?)"
        raise HookInputError(
            f"domain XML is not well-formed{hint}: {xml.parsers.expat.errors.messages[code]} "
            f"at line {exc.lineno}, column {exc.offset}"
        ) from None
    if parsed.root != "domain":
        raise HookInputError(f"domain XML root element is <{parsed.root}>, expected <domain>")
    return parsed


@dataclass
class _Iface:
    node: _Node
    name: str | None  # VMI interface name from the ua- alias
    why_not: str | None  # None when it is a virtio interface we can edit


def _classify(parsed: _Parsed) -> tuple[list[_Iface], dict[str, str]]:
    """Interfaces with their VMI name; plus non-editable device names -> reason."""
    ifaces: list[_Iface] = []
    other: dict[str, str] = {}
    for node in parsed.interfaces:
        alias = node.child_attr("alias", "name")
        name = alias[len(ALIAS_PREFIX):] if alias and alias.startswith(ALIAS_PREFIX) else None
        model = node.child_attr("model", "type")
        why = None
        if node.attrs.get("type") == "hostdev":
            why = "is an SR-IOV interface (type='hostdev'), not virtio"
        elif model not in VIRTIO_MODELS:
            why = f"has model {model!r}, not virtio"
        ifaces.append(_Iface(node, name, why))
        if name and why:
            other[name] = why
    for node in parsed.hostdevs:
        alias = node.child_attr("alias", "name") or ""
        if alias.startswith(ALIAS_PREFIX):
            reason = "is a <hostdev> device (SR-IOV/PCI passthrough), not virtio"
            name = alias[len(ALIAS_PREFIX):]
            other[name] = reason
            if name.startswith("sriov-"):  # KubeVirt's SR-IOV alias: ua-sriov-<iface>
                other[name[len("sriov-"):]] = reason
    return ifaces, other


def _indent_before(data: bytes, pos: int) -> tuple[bytes, bytes] | None:
    """(newline, indent) if the tag at pos starts its own line, else None (compact XML)."""
    nl = data.rfind(b"\n", 0, pos)
    if nl < 0:
        return None
    indent = data[nl + 1:pos]
    if indent.strip(b" \t"):
        return None
    newline = b"\r\n" if data[nl - 1:nl] == b"\r" else b"\n"
    return newline, indent


def _indent_unit(data: bytes, parent: _Node, child: _Node) -> bytes:
    outer, inner = _indent_before(data, parent.start), _indent_before(data, child.start)
    if outer and inner and inner[1].startswith(outer[1]) and len(inner[1]) > len(outer[1]):
        return inner[1][len(outer[1]):]
    return b"\t"


def _element(name: bytes, attrs: tuple[tuple[str, str], ...], quote: bytes) -> bytes:
    return b"<" + name + b"".join(
        b" " + k.encode() + b"=" + quote + v.encode() + quote for k, v in attrs) + b"/>"


def _updated_tag(data: bytes, node: _Node, want: tuple[tuple[str, str], ...],
                 quote: bytes) -> bytes | None:
    """The node's start tag with the wanted attribute values, or None if already so."""
    if all(node.attrs.get(k) == v for k, v in want):
        return None
    tag = _Tag(data, node.start)
    by_name = {a.name: a for a in tag.attrs}
    for k, v in want:
        if k in by_name:
            by_name[k].raw = v.encode()
        else:
            tag.attrs.append(_Attr(k, quote, v.encode()))
    return tag.render(close=tag.self_closing)


def _edit_interface(data: bytes, iface: _Node, settings: Settings,
                    out: list[tuple[int, int, bytes]]) -> None:
    """Append (start, end, replacement) splices that put the offload settings on iface."""
    first = _Tag(data, iface.start).attrs
    quote = first[0].quote if first else b"'"
    wanted = []
    if settings.host_off:
        wanted.append((b"host", HOST_OFF))
    if settings.guest_off:
        wanted.append((b"guest", GUEST_OFF))
    driver = iface.child("driver")
    anchor = iface.child("model") or (iface.children[-1] if iface.children else None)
    ref = driver or anchor
    unit = _indent_unit(data, iface, ref) if ref else b"\t"
    layout = _indent_before(data, ref.start) if ref else None

    missing: list[bytes] = []
    for name, attrs in wanted:
        present = [c for c in driver.children if c.name == name.decode()] if driver else []
        for node in present:
            new = _updated_tag(data, node, attrs, quote)
            if new is not None:
                out.append((node.start, node.start_end, new))
        if not present:
            missing.append(_element(name, attrs, quote))
    if not missing:
        return

    def block(items: list[bytes], indent: bytes | None) -> bytes:
        if layout is None or indent is None:
            return b"".join(items)
        return b"".join(layout[0] + indent + item for item in items)

    own = layout[1] if layout else None
    child_indent = own + unit if own is not None else None
    if driver is None:
        new_driver = b"<driver>" + block(missing, child_indent) + (
            layout[0] + own if layout else b"") + b"</driver>"
        if anchor is None:  # empty <interface/> cannot be virtio; kept for safety
            return
        out.append((anchor.end, anchor.end, block([new_driver], own)))
    elif driver.close_start is None:  # <driver .../>: reopen it
        tag = _Tag(data, driver.start)
        out.append((driver.start, driver.end, tag.render(close=False) + block(
            missing, child_indent) + (layout[0] + own if layout else b"") + b"</driver>"))
    else:  # <driver ...>...</driver>: insert before the trailing whitespace of the content
        content = data[driver.start_end:driver.close_start]
        tail = len(content) - len(content.rstrip(b" \t\r\n"))
        nl = content.rfind(b"\n", len(content) - tail) if tail else -1
        if layout is not None and nl >= 0:
            pos = driver.start_end + nl - (1 if content[nl - 1:nl] == b"\r" else 0)
            out.append((pos, pos, block(missing, child_indent)))
        else:
            pos = driver.close_start
            out.append((pos, pos, block(missing, child_indent) + (
                layout[0] + own if layout else b"")))


def edit_xml(domain_xml: bytes, settings: Settings) -> bytes:
    """Return domain_xml with checksum offload set per settings on the selected interfaces.

    Raises HookInputError for bad XML or for a selected interface that is not virtio.
    Interfaces named in settings but absent from the domain (not plugged yet) are skipped.
    """
    data = bytes(domain_xml)
    parsed = _parse(data)
    if not settings.changes_anything:
        return data
    ifaces, other = _classify(parsed)
    if settings.interfaces is None:
        chosen = [i for i in ifaces if i.why_not is None]
    else:
        for name in settings.interfaces:
            if name in other:
                raise HookInputError(
                    f"interface {name!r} {other[name]}; checksum offload can only be "
                    "changed on virtio interfaces"
                )
        wanted = set(settings.interfaces)
        chosen = [i for i in ifaces if i.why_not is None and i.name in wanted]
    splices: list[tuple[int, int, bytes]] = []
    for iface in chosen:
        _edit_interface(data, iface.node, settings, splices)
    if not splices:
        return data
    parts: list[bytes] = []
    pos = 0
    for start, end, new in sorted(splices, key=lambda s: (s[0], s[1])):
        parts += [data[pos:start], new]
        pos = end
    parts.append(data[pos:])
    return b"".join(parts)


def on_define_domain(domain_xml: bytes, vmi_json: bytes) -> tuple[bytes, str]:
    """edit_domain(), also returning the VMI's "namespace/name" (for log lines)."""
    vmi = load_vmi(vmi_json)
    ident = vmi_ident(vmi)
    try:
        return edit_xml(domain_xml, settings_from_vmi(vmi)), ident
    except HookInputError as exc:
        raise HookInputError(f"VMI {ident}: {exc}") from None


def edit_domain(domain_xml: bytes, vmi_json: bytes) -> bytes:
    """One call for KubeVirt's OnDefineDomain: settings from the VMI, then the XML edit.

    Raises HookInputError (a ValueError) with a human message on bad input; messages
    about the domain or the annotations start with "VMI namespace/name: ".
    """
    return on_define_domain(domain_xml, vmi_json)[0]
