// SPDX-License-Identifier: GPL-2.0
/*
 * VM datapath, "bpf" variant: one tc ingress program (cls_bpf, direct-action mode) for every
 * VM of the node, attached to both bridge ports of each launcher netns (the VM's tap and the
 * pod's veth). It moves every frame straight to the other port, skipping the in-pod bridge
 * (k6t-<name>), except what is meant for the launcher itself, which goes on to the bridge
 * (TC_ACT_OK ends classification in direct-action mode; the frame continues to the bridge's
 * rx_handler):
 *  - DHCP (UDP dport 67/68) and DHCPv6 (UDP dport 546/547): virt-launcher's DHCP server
 *    listens on the bridge; only a first (or only) IPv4 fragment carries a UDP header;
 *  - frames whose Ethernet destination is the bridge's MAC;
 *  - ARP whose target protocol address is a bridge IPv4 address, and ICMPv6 neighbour
 *    solicitations whose target is a bridge IPv6 address.
 * Everything else: tap -> veth by bpf_redirect_peer() (into the ingress of the veth's peer on
 * the node, skipping veth_xmit and the backlog hop) when VM_F_REDIRECT_PEER is set, else
 * bpf_redirect() to the peer device's egress; veth -> tap by bpf_redirect() to the tap.
 *
 * Compiled once per node (node_helper/vm/bpf.py) and pinned with its two maps; each device
 * is configured by an entry of `vm_config`, keyed by the id in its filter's classid (see
 * struct vm_dev_key). A device without a matching entry (none, or one for another ifindex)
 * is not ours or is being set up / torn down: its frames go to the bridge (fail open).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/pkt_cls.h>

#include "netaccel_abi.h"

#ifndef VM_PIN_DIR
#error "VM_PIN_DIR must be defined (the pin folder of the maps, as a string)"
#endif
#ifndef VM_PROG
#define VM_PROG netaccel_vm
#endif

#define ETH_P_ARP_ 0x0806
#define NEXTHDR_ICMPV6 58
#define ICMPV6_NEIGHBOUR_SOLICITATION 135
#define IP_FRAG_OFFSET 0x1fff /* host order, after bpf_ntohs of frag_off */

/* Both maps are pinned by bcc at VM_PIN_DIR (created there if missing, reused if present),
 * so a program compiled later shares them with the one already attached. */
BPF_TABLE_PINNED("hash", struct vm_dev_key, struct vm_dev_config, vm_config, 4096,
		 VM_PIN_DIR "/config");
BPF_TABLE_PINNED("percpu_hash", struct vm_dev_key, struct vm_dev_counters, vm_counters, 4096,
		 VM_PIN_DIR "/counters");

/*
 * Make sure the first `need` bytes of the frame are in the linear area, where direct packet
 * access (skb->data .. skb->data_end) can read them. Usually they are (small frames are
 * linear; GSO frames carry all their headers in the linear part). When not, and the frame is
 * that long, pull them in with bpf_skb_pull_data - only for the few bytes the classification
 * needs beyond the IP header (UDP ports, ARP/NS targets), never for TCP, so the hot path
 * never pulls (a pull can copy a cloned header). A frame shorter than `need` has no such
 * header: returns 0 and the caller classifies it as "not for the launcher".
 * The helper invalidates every packet pointer: callers re-read data/data_end after it.
 */
static __always_inline int linear(struct __sk_buff *skb, __u32 need)
{
	if ((void *)(long)skb->data + need <= (void *)(long)skb->data_end)
		return 1;
	if (need > skb->len)
		return 0;
	return bpf_skb_pull_data(skb, need) == 0;
}

/* IPv4: UDP to a DHCP port (first fragment only; header length from IHL, so options are
 * honoured). */
static __always_inline int ipv4_for_bridge(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	__u8 *ip = data + ETH_HLEN;
	__u32 ihl, off;
	__u16 frag, dport;
	__u8 *udp;

	/* The verifier only allows reads it can prove to be below data_end: every access needs
	 * a compare against `end` on the same (or a derived) pointer first. */
	if (ip + 20 > (__u8 *)end)
		return 0;
	if (ip[9] != IPPROTO_UDP)
		return 0;
	/* frag_off is big endian on the wire: bytes 6-7, low 13 bits the offset in 8-byte
	 * units. A non-first fragment has no UDP header, whatever its bytes look like. */
	frag = ((__u16)ip[6] << 8) | ip[7];
	if (frag & IP_FRAG_OFFSET)
		return 0;
	ihl = (ip[0] & 0x0f) * 4;
	if (ihl < 20)
		return 0;
	off = ETH_HLEN + ihl; /* 34..74: the verifier tracks this bounded variable offset */
	if (!linear(skb, off + 4))
		return 0;
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	udp = data + off;
	if (udp + 4 > (__u8 *)end)
		return 0;
	dport = ((__u16)udp[2] << 8) | udp[3]; /* network (big endian) order to host */
	return dport == 67 || dport == 68;
}

/* IPv6: DHCPv6 (UDP dport 546/547) or a neighbour solicitation for a bridge address. Neither
 * carries extension headers in practice: UDP / ICMPv6 must follow the fixed header. */
static __always_inline int ipv6_for_bridge(struct __sk_buff *skb,
					   const struct vm_dev_config *cfg)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	__u8 *ip6 = data + ETH_HLEN;
	__u8 nexthdr;
	__u32 t[4];
	int i;

	if (ip6 + 40 > (__u8 *)end)
		return 0;
	nexthdr = ip6[6];
	if (nexthdr == IPPROTO_UDP) {
		__u8 *udp;
		__u16 dport;

		if (!linear(skb, ETH_HLEN + 40 + 4))
			return 0;
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
		udp = data + ETH_HLEN + 40;
		if (udp + 4 > (__u8 *)end)
			return 0;
		dport = ((__u16)udp[2] << 8) | udp[3];
		return dport == 546 || dport == 547;
	}
	if (nexthdr != NEXTHDR_ICMPV6 || !cfg->n_ip6)
		return 0;
	/* ICMPv6 type at 0, target address at 8 of the ICMPv6 header: 24 bytes in all. */
	if (!linear(skb, ETH_HLEN + 40 + 24))
		return 0;
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	if (data + ETH_HLEN + 40 + 24 > end)
		return 0;
	if (*(__u8 *)(data + ETH_HLEN + 40) != ICMPV6_NEIGHBOUR_SOLICITATION)
		return 0;
	/* The target is not 4-byte aligned in the frame: copy it out (byte loads where
	 * needed) and compare raw words, which are in network order on both sides. */
	__builtin_memcpy(t, data + ETH_HLEN + 40 + 8, 16);
#pragma unroll
	for (i = 0; i < VM_MAX_IP6; i++) {
		if (i < cfg->n_ip6 && t[0] == cfg->ip6[4 * i] && t[1] == cfg->ip6[4 * i + 1] &&
		    t[2] == cfg->ip6[4 * i + 2] && t[3] == cfg->ip6[4 * i + 3])
			return 1;
	}
	return 0;
}

/* ARP (IPv4 over Ethernet) whose target protocol address is a bridge address. */
static __always_inline int arp_for_bridge(struct __sk_buff *skb,
					  const struct vm_dev_config *cfg)
{
	void *data, *end;
	__u8 *arp;
	__u32 tpa;
	int i;

	if (!cfg->n_ip4 || !linear(skb, ETH_HLEN + 28))
		return 0;
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	arp = data + ETH_HLEN;
	if (arp + 28 > (__u8 *)end)
		return 0;
	/* Protocol type (bytes 2-3, big endian) IPv4; target protocol address at 24. */
	if (arp[2] != 0x08 || arp[3] != 0x00)
		return 0;
	__builtin_memcpy(&tpa, arp + 24, 4); /* unaligned; stays in network order */
#pragma unroll
	for (i = 0; i < VM_MAX_IP4; i++) {
		if (i < cfg->n_ip4 && tpa == cfg->ip4[i])
			return 1;
	}
	return 0;
}

/* Is the frame for the bridge (the launcher), not for the other port? */
static __always_inline int for_bridge(struct __sk_buff *skb, const struct vm_dev_config *cfg)
{
	void *data, *end;
	struct ethhdr *eth;
	__u16 proto;

	if (!linear(skb, ETH_HLEN))
		return 0;
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > end)
		return 0;
	if (cfg->flags & VM_F_HAS_MAC) {
		__u32 hi_pkt, hi_cfg;
		__u16 lo_pkt, lo_cfg;

		__builtin_memcpy(&hi_pkt, eth->h_dest, 4);
		__builtin_memcpy(&lo_pkt, eth->h_dest + 4, 2);
		__builtin_memcpy(&hi_cfg, cfg->mac, 4);
		__builtin_memcpy(&lo_cfg, cfg->mac + 4, 2);
		if (hi_pkt == hi_cfg && lo_pkt == lo_cfg)
			return 1;
	}
	/* h_proto is big endian; the switch compares with constants converted at compile time.
	 * (skb->protocol would do as well: at tc ingress it is the same field.) */
	proto = eth->h_proto;
	if (proto == bpf_htons(ETH_P_IP))
		return ipv4_for_bridge(skb);
	if (proto == bpf_htons(ETH_P_IPV6))
		return ipv6_for_bridge(skb, cfg);
	if (proto == bpf_htons(ETH_P_ARP_))
		return arp_for_bridge(skb, cfg);
	return 0;
}

int VM_PROG(struct __sk_buff *skb)
{
	struct vm_dev_key key = {};
	struct vm_dev_config *cfg;
	struct vm_dev_counters *cnt;
	__u32 len = skb->len; /* before a pull (which does not change it anyway) */
	int bridge;

	/* cls_bpf copies the filter's classid into the skb before it runs the program. */
	key.id = skb->tc_classid;
	cfg = vm_config.lookup(&key);
	if (!cfg || cfg->ifindex != skb->ifindex) /* skb->ifindex: the device of this hook */
		return TC_ACT_OK;
	bridge = for_bridge(skb, cfg);
	cnt = vm_counters.lookup(&key); /* per-CPU: plain adds, no atomics */
	if (cnt) {
		if (bridge) {
			cnt->bridge_packets += 1;
			cnt->bridge_bytes += len;
		} else {
			cnt->redirected_packets += 1;
			cnt->redirected_bytes += len;
		}
	}
	if (bridge)
		return TC_ACT_OK;
	if (cfg->flags & VM_F_REDIRECT_PEER)
		/* The kernel scrubs the skb (netns switch) and runs the peer's receive path; it
		 * drops the frame if the target has no peer or the peer is in this netns, which
		 * user space rules out before setting the flag. */
		return bpf_redirect_peer(cfg->peer_ifindex, 0);
	return bpf_redirect(cfg->peer_ifindex, 0);
}
