// SPDX-License-Identifier: GPL-2.0
/*
 * netaccel node fast path: a tc ingress program (cls_bpf, direct action) on the node-side
 * veth of every accelerated endpoint (a pod, or the virt-launcher pod of a VM), compiled by
 * bcc and loaded by node_helper/fastpath.py, which also fills its maps.
 *
 * A frame the endpoint sends to another accelerated endpoint of this node (netaccel_fp_eps,
 * keyed by address) skips the node: no bridge, no routing, no node netfilter.  It goes with
 * bpf_redirect_peer() straight into the destination's network namespace (the ingress of its
 * eth0, or of a launcher's eth0-nic, where the VM datapath or the in-pod bridge takes it to
 * the VM's tap).  Everything else returns TC_ACT_OK and takes the CNI's path unchanged:
 * ARP/ND, DHCP, broadcast and multicast (no unicast endpoint address), fragments, IPv4 with
 * options, IPv6 with extension headers, protocols other than TCP and UDP, destinations
 * that are not accelerated endpoints of this node.
 *
 * POLICY: the node's netfilter (where many CNIs enforce NetworkPolicy) never sees a frame of
 * this path.  So a flow takes it only once the node's rules have judged it, which the node's
 * conntrack table (netns of the device) tells: a packet of the flow's ORIGINAL direction
 * needs the entry CONFIRMED (its first packet passed every netfilter hook of the node; a
 * packet a rule drops never confirms its entry, which then never enters the table), a packet
 * of the REPLY direction also needs IPS_SEEN_REPLY (a reply crossed the node before).  So
 * the first packet of every flow and its first reply take the kernel path and its rules, and
 * one-way flows (a UDP stream) take the fast path from their second packet.  Limits, said in
 * docs/fastpath.md: a rule added later does not stop a flow already on the path until its
 * conntrack entry expires (fast-path packets do not refresh it; then the flow is judged
 * again); conntrack sets SEEN_REPLY before the filter hooks run, so a rule that drops only
 * the replies of a flow whose first packet it accepted (stateless, outside NetworkPolicy's
 * semantics, where replies of an allowed connection are allowed) is enforced for the first
 * reply only; and a node whose conntrack is not active (no rule uses it) has no entries, so
 * nothing takes the path (counted: ct_misses).
 *
 * REMOTE (another node): a frame for an address in netaccel_fp_remote (accelerated endpoints
 * of other nodes) is routed as the node would route it: bpf_fib_lookup() in the node's tables
 * (tot_len 0: the helper then checks a GSO packet per segment), bpf_check_mtu() per segment
 * on the chosen device (a packet that does not fit goes to the kernel path, which answers
 * with ICMP "fragmentation needed" as it would), TTL / hop limit - 1, and
 * bpf_redirect_neigh() to that device (the kernel fills in the MACs from its neighbour
 * table, resolving them if needed): the VXLAN device of an encapsulating CNI, or the uplink
 * of a routed one.  On the receiving node the same program on that device's ingress sees
 * the decapsulated frame, finds the local endpoint and takes it in as a routed hop.  Same
 * conntrack rule on both nodes.  A lookup that does not end in a device (no route,
 * forwarding off, blackhole...) leaves the frame to the kernel path.
 *
 * MACS AND TTL: the frame arrives as the sender built it.  If its destination MAC is the
 * destination endpoint's own MAC, the sender reached it over L2 (a bridge CNI: one subnet):
 * the CNI's own path would not touch it, so neither do we (TTL kept).  Otherwise the sender
 * sent it to its gateway (a routed CNI): the CNI's path would route it, so we do what a router
 * does: destination MAC = the endpoint's MAC, source MAC = the MAC the endpoint knows as its
 * gateway, TTL / hop limit - 1 (a packet that would reach 0 goes to the kernel path, which
 * answers with ICMP), IPv4 header checksum updated (TTL is not in the TCP/UDP checksum).
 * The destination MAC matters: a VM's launcher has a bridge inside (KubeVirt bridge binding)
 * that forwards by MAC, and bpf_redirect_peer() does not rerun eth_type_trans().
 *
 * KFUNCS: bpf_skb_ct_lookup() and bpf_ct_release() are kernel functions (kfuncs), which bcc
 * 0.26 cannot declare.  They are declared here like bcc's helpers, as constant function
 * pointers whose value is the kfunc's BTF id (NA_KF_*, read from the running kernel's BTF by
 * the loader); clang emits "call <id>" and the loader marks those calls as kfunc calls
 * (src_reg = BPF_PSEUDO_KFUNC_CALL) before loading.  The verifier then checks them against
 * BTF like any kfunc call: the nf_conn reference must be released on every path, and
 * ct->status is read at its BTF offset (NA_OFF_NF_CONN_STATUS) with a plain load, which the
 * verifier checks against the member's bounds.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/udp.h>

#include "netaccel_abi.h"

#ifndef NA_PROG_FP
#define NA_PROG_FP netaccel_fp
#endif
#if !defined(NA_KF_CT_LOOKUP) || !defined(NA_KF_CT_RELEASE) || !defined(NA_OFF_NF_CONN_STATUS)
#error "the loader passes the kfunc BTF ids and nf_conn.status's offset (node_helper/fastpath.py)"
#endif

#define IPS_SEEN_REPLY 2  /* uapi nf_conntrack_common.h: 1 << IPS_SEEN_REPLY_BIT */
#define IPS_CONFIRMED 8   /* 1 << IPS_CONFIRMED_BIT */
#define CT_DIR_ORIGINAL 0 /* bpf_ct_opts.dir after a lookup: which tuple of the entry matched */
#define CT_CURRENT_NETNS (-1)  /* BPF_F_CURRENT_NETNS: the conntrack table of skb->dev's netns */

struct nf_conn;
struct bpf_ct_opts {  /* kernel ABI of the conntrack kfuncs (net/netfilter/nf_conntrack_bpf.c) */
	__s32 netns_id;
	__s32 error;
	__u8 l4proto;
	__u8 dir;
	__u16 ct_zone_id;
	__u8 ct_zone_dir;
	__u8 reserved[3];
};
static struct nf_conn *(*ct_lookup)(struct __sk_buff *, struct bpf_sock_tuple *, __u32,
				    struct bpf_ct_opts *, __u32) = (void *)NA_KF_CT_LOOKUP;
static void (*ct_release)(struct nf_conn *) = (void *)NA_KF_CT_RELEASE;

BPF_TABLE_PINNED("hash", struct fp_addr_key, struct fp_endpoint, netaccel_fp_eps, 16384,
		 NA_PIN_DIR "/endpoints");
BPF_TABLE_PINNED("percpu_hash", struct fp_dev_key, struct fp_counters, netaccel_fp_cnt, 16384,
		 NA_PIN_DIR "/counters");
/* REMOTE: address ranges of accelerated endpoints on other nodes (IPv4 a.b.c.d/n stored as
 * ::ffff:a.b.c.d/(96+n), as the socket bypass's set). */
BPF_TABLE_PINNED("lpm_trie", struct lpm_key, __u32, netaccel_fp_remote, 4096,
		 NA_PIN_DIR "/remote", BPF_F_NO_PREALLOC);

/* bcc 0.26 declares bpf_redirect_neigh() without its `plen` argument (so a nexthop would be
 * ignored): the helper's real prototype. */
static long (*redirect_neigh)(__u32 ifindex, struct bpf_redir_neigh *params, int plen,
			      __u64 flags) = (void *)BPF_FUNC_redirect_neigh;
#define NA_AF_INET 2
#define NA_AF_INET6 10
#define NA_MTU_CHK_SEGS 1  /* BPF_MTU_CHK_SEGS: check each GSO segment, not the super-packet */

struct ports {
	__be16 source;
	__be16 dest;
};

/* POLICY: have the node's rules judged this direction of the flow?  1 yes, 0 no (no entry:
 * the first packet, or one a rule dropped; or a reply before the first reply crossed). */
static __always_inline int judged(struct __sk_buff *skb, struct bpf_sock_tuple *t,
				  __u32 tuple_size, __u8 l4proto)
{
	struct bpf_ct_opts opts = {.netns_id = CT_CURRENT_NETNS, .l4proto = l4proto};
	struct nf_conn *ct;
	unsigned long status;

	ct = ct_lookup(skb, t, tuple_size, &opts, sizeof(opts));
	if (!ct)
		return 0;
	status = *(unsigned long *)((char *)ct + NA_OFF_NF_CONN_STATUS);
	ct_release(ct);
	if (!(status & IPS_CONFIRMED))
		return 0;
	return opts.dir == CT_DIR_ORIGINAL || (status & IPS_SEEN_REPLY);
}

static __always_inline int same_mac(const unsigned char *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] &&
	       a[5] == b[5];
}

static __always_inline int remote_endpoint(struct fp_addr_key *key)
{
	struct lpm_key k = {.prefixlen = 128};

	__builtin_memcpy(k.addr, key->addr, 16);
	return netaccel_fp_remote.lookup(&k) != NULL;
}

/* A routed hop: TTL / hop limit - 1, the IPv4 header checksum updated (TTL is the high byte
 * of the 16-bit word (ttl, protocol) the checksum sums; it is not in the TCP/UDP checksum).
 * Reads the packet pointers afresh (callers have called helpers that invalidate them).
 * 0, or -1 when the headers are not there. */
static __always_inline int decrement_hops(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return -1;
	if (eth->h_proto == __builtin_bswap16(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		__u16 old, new;

		if ((void *)(ip + 1) > data_end)
			return -1;
		old = *(__u16 *)&ip->ttl;
		ip->ttl--;
		new = *(__u16 *)&ip->ttl;
		bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), old, new, 2);
	} else {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return -1;
		ip6->hop_limit--;
	}
	return 0;
}

/* REMOTE: route the frame as the node would and hand it to the device the route chose. */
static __always_inline int to_remote(struct __sk_buff *skb, struct fp_counters *cnt,
				     __u8 l4proto, __u32 len)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct bpf_fib_lookup fib = {};
	struct bpf_redir_neigh nh = {};
	__u32 mtu = 0;
	long rc;

	fib.l4_protocol = l4proto;
	fib.ifindex = skb->ingress_ifindex;
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;
	if (eth->h_proto == __builtin_bswap16(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end)
			return TC_ACT_OK;
		fib.family = NA_AF_INET;
		fib.tos = ip->tos;
		fib.ipv4_src = ip->saddr;
		fib.ipv4_dst = ip->daddr;
	} else {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return TC_ACT_OK;
		fib.family = NA_AF_INET6;
		__builtin_memcpy(fib.ipv6_src, &ip6->saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, &ip6->daddr, 16);
	}
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if ((rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) ||
	    bpf_check_mtu(skb, fib.ifindex, &mtu, 0, NA_MTU_CHK_SEGS) != 0) {
		cnt->passed_packets++;
		return TC_ACT_OK;
	}
	if (decrement_hops(skb))
		return TC_ACT_OK;
	nh.nh_family = fib.family;  /* after the lookup, the destination is the next hop */
	if (fib.family == NA_AF_INET)
		nh.ipv4_nh = fib.ipv4_dst;
	else
		__builtin_memcpy(nh.ipv6_nh, fib.ipv6_dst, 16);
	cnt->remote_packets++;
	cnt->remote_bytes += len;
	return redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
}

int NA_PROG_FP(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct bpf_sock_tuple t = {};
	struct fp_addr_key key = {};
	struct fp_dev_key dev = {.ifindex = skb->ingress_ifindex};
	struct fp_endpoint *ep;
	struct fp_counters *cnt;
	struct ports *l4;
	__u32 tuple_size, len = skb->len;
	__u8 l4proto, *hops;
	int routed;

	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;
	if (eth->h_proto == __builtin_bswap16(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end || ip->ihl != 5)
			return TC_ACT_OK;
		if (ip->frag_off & __builtin_bswap16(0x3fff))  /* MF or an offset: a fragment */
			return TC_ACT_OK;
		key.addr[2] = __builtin_bswap32(0xffff);
		key.addr[3] = ip->daddr;
		ep = netaccel_fp_eps.lookup(&key);
		if (!ep && !remote_endpoint(&key))
			return TC_ACT_OK;  /* not for an accelerated endpoint */
		l4proto = ip->protocol;
		l4 = (void *)(ip + 1);
		t.ipv4.saddr = ip->saddr;
		t.ipv4.daddr = ip->daddr;
		tuple_size = sizeof(t.ipv4);
		hops = &ip->ttl;
	} else if (eth->h_proto == __builtin_bswap16(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return TC_ACT_OK;
		__builtin_memcpy(key.addr, &ip6->daddr, 16);
		ep = netaccel_fp_eps.lookup(&key);
		if (!ep && !remote_endpoint(&key))
			return TC_ACT_OK;
		l4proto = ip6->nexthdr;  /* extension headers: not TCP/UDP here, kernel path */
		l4 = (void *)(ip6 + 1);
		__builtin_memcpy(t.ipv6.saddr, &ip6->saddr, 16);
		__builtin_memcpy(t.ipv6.daddr, &ip6->daddr, 16);
		tuple_size = sizeof(t.ipv6);
		hops = &ip6->hop_limit;
	} else {
		return TC_ACT_OK;
	}

	cnt = netaccel_fp_cnt.lookup(&dev);
	if (!cnt)
		return TC_ACT_OK;  /* a device the agent did not configure: hands off */
	if ((l4proto != IPPROTO_TCP && l4proto != IPPROTO_UDP) || (void *)(l4 + 1) > data_end ||
	    (ep && ep->ifindex == dev.ifindex)) {
		cnt->passed_packets++;
		return TC_ACT_OK;
	}
	if (eth->h_proto == __builtin_bswap16(ETH_P_IP)) {
		t.ipv4.sport = l4->source;
		t.ipv4.dport = l4->dest;
	} else {
		t.ipv6.sport = l4->source;
		t.ipv6.dport = l4->dest;
	}
	/* To another node: always a routed hop (the node routes it). */
	routed = !ep || !same_mac(eth->h_dest, ep->mac);
	/* A routed hop needs a TTL to decrement (at 1 the kernel path answers with ICMP time
	 * exceeded) and, to a local endpoint, the gateway MAC it knows. */
	if (routed && ((ep && !(ep->flags & FP_F_HAS_GW)) || *hops <= 1)) {
		cnt->passed_packets++;
		return TC_ACT_OK;
	}
	/* POLICY: only flows (directions) the node's rules have judged. */
	if (!judged(skb, &t, tuple_size, l4proto)) {
		cnt->ct_misses++;
		cnt->passed_packets++;
		return TC_ACT_OK;
	}
	if (!ep)
		return to_remote(skb, cnt, l4proto, len);
	if (routed) {
		if (decrement_hops(skb))
			return TC_ACT_OK;
		/* judged()'s kfunc and the checksum helper invalidated the packet pointers */
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		eth = data;
		if ((void *)(eth + 1) > data_end)
			return TC_ACT_OK;
		__builtin_memcpy(eth->h_dest, ep->mac, 6);
		__builtin_memcpy(eth->h_source, ep->gw_mac, 6);
	}
	cnt->fast_packets++;
	cnt->fast_bytes += len;
	return bpf_redirect_peer(ep->ifindex, 0);
}
