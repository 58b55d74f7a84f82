// SPDX-License-Identifier: GPL-2.0
/*
 * VM datapath, "bpf" variant: tc ingress programs (cls_bpf, direct-action mode) that move
 * every frame straight between a KubeVirt VM's tap and the pod's veth with bpf_redirect(),
 * skipping the in-pod bridge (k6t-<name>).
 *
 * Exception: DHCP (UDP dport 67/68) and DHCPv6 (UDP dport 546/547) must still reach the
 * bridge, where virt-launcher's DHCP server listens. For those we return TC_ACT_OK, which in
 * direct-action mode ends tc classification and lets the packet continue up the stack to
 * the bridge's rx_handler - the same effect as the u32 "classid, no action" filter of the
 * mirror variant.
 *
 * Compiled by bcc at run time (node_helper/vm_mirror.py) with:
 *   -DTAP_IFINDEX=<n> -DVETH_IFINDEX=<n>   the two bridge ports in the launcher netns
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

/* Counter slots; keep in sync with COUNTER_SLOTS in node_helper/vm_mirror.py. */
#define SLOT_TAP_TO_VETH 0   /* redirected tap -> veth */
#define SLOT_VETH_TO_TAP 1   /* redirected veth -> tap */
#define SLOT_TAP_TO_BRIDGE 2 /* DHCP from the guest, passed to the bridge */
#define SLOT_VETH_TO_BRIDGE 3 /* DHCP from the pod side, passed to the bridge */

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

/* Attached to the tap's ingress: frames the guest sent. */
int tap_to_veth(struct __sk_buff *skb)
{
    if (is_dhcp(skb)) {
        count(SLOT_TAP_TO_BRIDGE, skb);
        return TC_ACT_OK;
    }
    count(SLOT_TAP_TO_VETH, skb);
    /* Egress of the veth: the frame leaves towards the node as if the bridge had
     * forwarded it. */
    return bpf_redirect(VETH_IFINDEX, 0);
}

/* Attached to the veth's ingress: frames from the pod network towards the guest. */
int veth_to_tap(struct __sk_buff *skb)
{
    if (is_dhcp(skb)) {
        count(SLOT_VETH_TO_BRIDGE, skb);
        return TC_ACT_OK;
    }
    count(SLOT_VETH_TO_TAP, skb);
    return bpf_redirect(TAP_IFINDEX, 0);
}
