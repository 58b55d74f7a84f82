// SPDX-License-Identifier: GPL-2.0
/*
 * VM datapath, "bpf" variant: tc ingress programs (cls_bpf, direct-action mode) that move
 * every frame straight between a KubeVirt VM's tap and the pod's veth, skipping the in-pod
 * bridge (k6t-<name>):
 *  - veth -> tap: bpf_redirect() to the tap's egress (towards QEMU / the guest);
 *  - tap -> veth: bpf_redirect_peer() (kernel >= 5.10, tc ingress only) when REDIRECT_PEER
 *    is 1: the frame goes straight into the ingress of the veth's peer (the node side, in
 *    another netns), as if the peer had received it, skipping the veth's transmit path
 *    (veth_xmit) and the softirq hop through the CPU's backlog queue; the veth's own tx
 *    counters do not see these frames, the peer's rx counters do. With REDIRECT_PEER 0
 *    (user space decides: the pod device is not a veth, or its peer is in the same netns,
 *    where the kernel would drop the frame) it is bpf_redirect() to the veth's egress.
 *
 * Exception: what is meant for the launcher itself must still reach the bridge:
 *  - DHCP (UDP dport 67/68) and DHCPv6 (UDP dport 546/547): virt-launcher's DHCP server
 *    listens on the bridge;
 *  - frames whose Ethernet destination is the bridge's MAC (ARP replies to the launcher,
 *    unicast DHCP renewals, anything addressed to the launcher);
 *  - ARP whose target protocol address is a bridge IPv4 address, and ICMPv6 neighbour
 *    solicitations whose target is a bridge IPv6 address (a guest renewing its lease by
 *    unicast first resolves the server's address).
 * For those we return TC_ACT_OK, which in direct-action mode ends tc classification and lets
 * the packet continue up the stack to the bridge's rx_handler - the same effect as the u32
 * "classid, no action" filters of the mirror variant. Both directions apply the same rules.
 *
 * Compiled by bcc at run time (node_helper/vm_mirror.py, _bpf_cflags) with:
 *   -DTAP_IFINDEX=<n> -DVETH_IFINDEX=<n>   the two bridge ports in the launcher netns
 *   -DREDIRECT_PEER=0|1                    tap -> veth by bpf_redirect_peer (see above)
 *   -DBRIDGE_HAS_MAC=0|1 -DBRIDGE_MAC_HI=<bytes 0-3> -DBRIDGE_MAC_LO=<bytes 4-5>
 *                                          the bridge's MAC as host-order integers
 *   -D'IS_BRIDGE_IP4(a)=(0||(a)==0x...U||...)'
 *   -D'IS_BRIDGE_IP6(a,b,c,d)=(0||((a)==0x...U&&(b)==...&&(d)==...)||...)'
 *                                          the bridge's addresses (host-order words)
 * read when the program is built: a changed set needs a re-apply (which rebuilds it).
 * One object holds both directions, so they share one counters map, which user space finds
 * again after a restart through the program id in the tc filter dump (prog -> map ids).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/pkt_cls.h>

#ifndef TAP_IFINDEX
#error "TAP_IFINDEX must be defined"
#endif
#ifndef VETH_IFINDEX
#error "VETH_IFINDEX must be defined"
#endif
#ifndef REDIRECT_PEER
#define REDIRECT_PEER 0
#endif
#ifndef BRIDGE_HAS_MAC
#define BRIDGE_HAS_MAC 0
#define BRIDGE_MAC_HI 0
#define BRIDGE_MAC_LO 0
#endif
#ifndef IS_BRIDGE_IP4
#define IS_BRIDGE_IP4(a) 0
#endif
#ifndef IS_BRIDGE_IP6
#define IS_BRIDGE_IP6(a, b, c, d) 0
#endif

#define NEXTHDR_ICMPV6 58
#define ICMPV6_NEIGHBOUR_SOLICITATION 135

/* Counter slots; keep in sync with COUNTER_SLOTS in node_helper/vm_mirror.py. */
#define SLOT_TAP_TO_VETH 0   /* redirected tap -> veth (to the peer's ingress or egress) */
#define SLOT_VETH_TO_TAP 1   /* redirected veth -> tap */
#define SLOT_TAP_TO_BRIDGE 2 /* from the guest, passed to the bridge (DHCP, launcher) */
#define SLOT_VETH_TO_BRIDGE 3 /* from the pod side, passed to the bridge (DHCP, launcher) */

struct counter {
    u64 packets;
    u64 bytes;
};

/* Per-CPU: no atomics on the hot path; user space sums the CPUs. */
BPF_PERCPU_ARRAY(counters, struct counter, 4);

static __always_inline void count(u32 slot, struct __sk_buff *skb)
{
    struct counter *c = counters.lookup(&slot);

    if (c) {
        c->packets += 1;
        c->bytes += skb->len;
    }
}

/* UDP destination port (host order) of an IPv4/IPv6 packet, or 0 if it is not UDP (or not
 * the first fragment). Offsets are from the Ethernet header: at tc ingress cls_bpf sees the
 * frame from its MAC header. bpf_skb_load_bytes copes with non-linear skbs. */
static __always_inline u16 udp_dport(struct __sk_buff *skb)
{
    __be16 port;

    if (skb->protocol == bpf_htons(ETH_P_IP)) {
        u8 ver_ihl, proto;
        __be16 frag;

        if (bpf_skb_load_bytes(skb, ETH_HLEN, &ver_ihl, 1) < 0 ||
            bpf_skb_load_bytes(skb, ETH_HLEN + 6, &frag, 2) < 0 ||
            bpf_skb_load_bytes(skb, ETH_HLEN + 9, &proto, 1) < 0)
            return 0;
        /* Only the first fragment carries the UDP header. */
        if (proto != IPPROTO_UDP || (bpf_ntohs(frag) & 0x1fff))
            return 0;
        /* Unlike the u32 variant, honour IP options: the header length is IHL * 4. */
        if (bpf_skb_load_bytes(skb, ETH_HLEN + (ver_ihl & 0x0f) * 4 + 2, &port, 2) < 0)
            return 0;
        return bpf_ntohs(port);
    }
    if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
        u8 nexthdr;

        /* DHCPv6 carries no extension headers in practice: UDP must follow directly. */
        if (bpf_skb_load_bytes(skb, ETH_HLEN + 6, &nexthdr, 1) < 0 || nexthdr != IPPROTO_UDP)
            return 0;
        if (bpf_skb_load_bytes(skb, ETH_HLEN + 40 + 2, &port, 2) < 0)
            return 0;
        return bpf_ntohs(port);
    }
    return 0;
}

static __always_inline int is_dhcp(struct __sk_buff *skb)
{
    u16 dport = udp_dport(skb);

    if (skb->protocol == bpf_htons(ETH_P_IP))
        return dport == 67 || dport == 68;
    return dport == 546 || dport == 547;
}

/* Is the frame meant for the launcher itself (the bridge's own MAC or addresses)? */
static __always_inline int for_launcher(struct __sk_buff *skb)
{
    if (BRIDGE_HAS_MAC) {
        __be32 hi;
        __be16 lo;

        if (bpf_skb_load_bytes(skb, 0, &hi, 4) == 0 && bpf_skb_load_bytes(skb, 4, &lo, 2) == 0 &&
            bpf_ntohl(hi) == BRIDGE_MAC_HI && bpf_ntohs(lo) == BRIDGE_MAC_LO)
            return 1;
    }
    if (skb->protocol == bpf_htons(ETH_P_ARP)) {
        __be16 ptype;
        __be32 tpa;

        /* Protocol type at 2, target protocol address at 24 of the ARP header. */
        if (bpf_skb_load_bytes(skb, ETH_HLEN + 2, &ptype, 2) < 0 ||
            ptype != bpf_htons(ETH_P_IP) ||
            bpf_skb_load_bytes(skb, ETH_HLEN + 24, &tpa, 4) < 0)
            return 0;
        return IS_BRIDGE_IP4(bpf_ntohl(tpa));
    }
    if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
        u8 nexthdr, type;
        __be32 t[4];

        /* A neighbour solicitation carries no extension headers: ICMPv6 follows directly,
         * its target address at 8 of the ICMPv6 header. */
        if (bpf_skb_load_bytes(skb, ETH_HLEN + 6, &nexthdr, 1) < 0 || nexthdr != NEXTHDR_ICMPV6 ||
            bpf_skb_load_bytes(skb, ETH_HLEN + 40, &type, 1) < 0 ||
            type != ICMPV6_NEIGHBOUR_SOLICITATION ||
            bpf_skb_load_bytes(skb, ETH_HLEN + 48, t, 16) < 0)
            return 0;
        return IS_BRIDGE_IP6(bpf_ntohl(t[0]), bpf_ntohl(t[1]), bpf_ntohl(t[2]), bpf_ntohl(t[3]));
    }
    return 0;
}

/* Attached to the tap's ingress: frames the guest sent. */
int tap_to_veth(struct __sk_buff *skb)
{
    if (for_launcher(skb) || is_dhcp(skb)) {
        count(SLOT_TAP_TO_BRIDGE, skb);
        return TC_ACT_OK;
    }
    count(SLOT_TAP_TO_VETH, skb);
    if (REDIRECT_PEER)
        /* Ingress of the veth's peer (the node side): the frame arrives there as if the
         * veth had sent it, without the veth_xmit + backlog queue hop. The kernel scrubs
         * the skb (netns switch) and re-runs the receive path on the peer; it drops the
         * frame if the target has no peer (not a veth/netkit), the peer is down or in this
         * same netns - hence the decision in user space. bcc's helpers.h declares the
         * helper (BPF_FUNC_redirect_peer, id 155, in the 6.1 uapi headers too). */
        return bpf_redirect_peer(VETH_IFINDEX, 0);
    /* Egress of the veth: the frame leaves towards the node as if the bridge had
     * forwarded it. */
    return bpf_redirect(VETH_IFINDEX, 0);
}

/* Attached to the veth's ingress: frames from the pod network towards the guest. */
int veth_to_tap(struct __sk_buff *skb)
{
    if (for_launcher(skb) || is_dhcp(skb)) {
        count(SLOT_VETH_TO_BRIDGE, skb);
        return TC_ACT_OK;
    }
    count(SLOT_VETH_TO_TAP, skb);
    return bpf_redirect(TAP_IFINDEX, 0);
}
