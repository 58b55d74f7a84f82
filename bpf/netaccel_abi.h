/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The layouts BPF programs and user space share: map keys, values and counters.
 *
 * User space does not copy these: node_helper/bpf_abi.py parses this file (package data
 * like the programs) and checks each layout against the map types bcc compiled, so a change
 * on one side fails loudly at load time instead of misreading a map.  Keep to what that
 * parser reads: one `struct name {` ... `};` block per layout, one field per line, fields of
 * type __u8/__u16/__u32/__u64 or fixed arrays of them, comments anywhere.
 */
#ifndef NETACCEL_ABI_H
#define NETACCEL_ABI_H

/* ---- socket bypass (sockmap.c) ---- */

/* A TCP socket's 4-tuple: the SOCKHASH key.  Addresses are 16 bytes, IPv4 as ::ffff:a.b.c.d
 * (network byte order words); ports in host byte order. */
struct sock_key {
	__u32 local[4];
	__u32 remote[4];
	__u32 lport;
	__u32 rport;
};

/* The accelerated set: an LPM trie over 128-bit addresses (IPv4 a.b.c.d/n is stored as
 * ::ffff:a.b.c.d/(96+n)). */
struct lpm_key {
	__u32 prefixlen;
	__u32 addr[4];
};

/* Node-wide counters of the bypass (one per-CPU array slot; user space sums the CPUs). */
struct bypass_counters {
	__u64 redirected_msgs;
	__u64 redirected_bytes;
	__u64 fallback_msgs;       /* messages of inserted sockets that took SK_PASS */
	__u64 fallback_dirs;       /* directions that missed their peer and fell back */
	__u64 fallback_dirs_rcv_lag;   /* directions moved to TCP: receiver's queue at its bound */
	__u64 fallback_dirs_node_mem;  /* directions moved to TCP: node TCP memory near pressure */
	__u64 inserted;            /* sockets put into the sockhash */
	__u64 skipped_not_in_set;  /* established sockets with an end outside the set */
	__u64 skipped_sent_data;   /* established sockets that had already sent data */
	__u64 insert_errors;       /* storage or sockhash update failed: not bypassed */
	__u64 no_state;            /* sk_msg ran on a socket without state: passed */
};

/* The loader's settings for the bypass's flow control (one array slot, netaccel_cfg). */
struct bypass_config {
	__u64 node_mem_limit_pages;  /* TCP memory_allocated (pages) above this: data takes TCP */
	__u64 rcv_floor_bytes;       /* per-connection bound is max(receiver's sk_rcvbuf, this) */
};

/* A bypassed socket as a redirect target (netaccel_peers, keyed by its own sock_key). */
struct peer_sock {
	__u64 sk;      /* its kernel struct sock address: read only with bpf_probe_read_kernel */
	__u64 cookie;  /* its socket cookie: only its own close removes the entry */
};

#endif
