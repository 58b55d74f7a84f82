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

/* Kinds of socket pairs (sockmap.c, PAIRING): which hop of a request a pair carries.
 * Indexes of the per-kind counters and peer_sock.kind. */
#define PAIR_POD_POD 0      /* no address rewritten: the two ends' 4-tuples mirror each other */
#define PAIR_OUTBOUND 1     /* app -> its own sidecar (the app's connection was REDIRECTed) */
#define PAIR_INBOUND 2      /* sidecar -> app, from a loopback source (Istio: 127.0.0.6) */
#define PAIR_PROXY_PROXY 3  /* across pods, REDIRECTed at the receiver (its inbound sidecar) */
#define PAIR_KINDS 4

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
	__u64 fallback_dirs_splice;    /* directions moved to TCP: their receiver splices */
	__u64 skipped_no_bypass;   /* established sockets of a no-bypass workload */
	__u64 splice_seen;         /* splice/sendfile/MSG_WAITALL reads of a bypassed socket */
	__u64 splice_safe;         /* ... with nothing queued or in flight: sender switched */
	__u64 splice_doomed;       /* ... with bytes queued or in flight: reset by user space */
	__u64 doomed_drops;        /* sender messages refused on a doomed connection */
	__u64 waitall_short;       /* MSG_WAITALL reads the queue could not fill: early return */
	__u64 demote_candidates;   /* directions that streamed small messages one-way: queued for
	                            * demotion (their socket leaves the sockhash; DEMOTION) */
	__u64 fallback_dirs_demote;    /* directions moved to TCP: the socket they send into leaves */
	__u64 fallback_dirs_zerocopy;  /* directions moved to TCP: their sender set SO_ZEROCOPY */
	__u64 uring_splice_fixed;  /* io_uring splices from a registered (fixed) file: the guard
	                            * cannot resolve those, they are not guarded (SPLICE, rule 8) */
	__u64 skipped_unpaired;    /* accepted sockets whose connecting end is not bypassed */
	__u64 pairs[PAIR_KINDS];   /* socket pairs formed, by kind (PAIR_*) */
	__u64 pair_redirected_bytes[PAIR_KINDS];  /* redirected bytes, by the pair's kind */
};

/* The loader's settings for the bypass's flow control (one array slot, netaccel_cfg). */
struct bypass_config {
	__u64 node_mem_limit_pages;  /* TCP memory_allocated (pages) above this: data takes TCP */
	__u64 rcv_floor_bytes;       /* per-connection bound is max(receiver's sk_rcvbuf, this) */
	/* Demotion policy (sockmap.c, DEMOTION): a direction that sends demote_msgs messages in a
	 * row, each smaller than demote_small_bytes, with no message from its peer in between,
	 * within demote_window_ns, leaves the bypass.  demote_msgs 0: never (policy "always"). */
	__u64 demote_small_bytes;
	__u64 demote_msgs;
	__u64 demote_window_ns;
};

/* A bypassed socket as a redirect target (netaccel_peers, keyed by the key its sender looks
 * up: its own 4-tuple, or for an accepted socket whose connection was REDIRECTed, the
 * connecting socket's 4-tuple reversed; sockmap.c, PAIRING). */
struct peer_sock {
	__u64 sk;      /* its kernel struct sock address: read only with bpf_probe_read_kernel */
	__u64 cookie;  /* its socket cookie: only its own close removes the entry */
	/* The splice guard's handshake with this socket's sender (sockmap.c, SPLICE). */
	__u64 pending_ts;    /* bpf_ktime_get_coarse_ns() (CLOCK_MONOTONIC, tick-coarse) of the sender's
	                      * last redirect decision */
	/* 64-bit: the programs change these two with atomic exchange/fetch-add, which the BPF
	 * instruction set level bcc compiles for offers on 64-bit words only. */
	__u64 pending;       /* 1: the sender decided to redirect; the bytes may not be queued yet */
	__u64 splice_block;  /* 1: this socket was read with splice/sendfile: sender, stop */
	/* Demotion (sockmap.c, DEMOTION).  Written by this socket's own sk_msg. */
	__u64 demoted;       /* 1: this socket is leaving the sockhash: its sender, stop */
	__u64 drained_ts;    /* demoted: bpf_ktime_get_ns() when it last saw its queue empty */
	/* The direction into this socket (written by its sender's sk_msg; statistics). */
	__u64 in_msgs;       /* messages its peer sent while in the sockhash (either path) */
	__u64 in_bytes;
	__u64 in_small;      /* ... smaller than demote_small_bytes */
	__u32 doomed;        /* 1: bytes may be stranded: refuse the sender, user space resets */
	__u32 passive;       /* 1: an accepted socket (its local port names the workload) */
	/* ZEROCOPY (sockmap.c, rule 12), set by the setsockopt tracepoint. */
	__u32 zerocopy;         /* 1: this socket set SO_ZEROCOPY: its sends take TCP */
	__u32 sender_zerocopy;  /* 1: the socket that sends into this one set SO_ZEROCOPY */
	__u32 kind;          /* PAIR_*: the kind of pair this socket belongs to, once paired */
};

/* Workloads the bypass leaves alone (netaccel_nobypass): an address and a local port, or
 * port 0 for every port of the address. Learned by the splice guard (value NB_LEARNED) or
 * configured by the agent (NB_CONFIGURED). */
#define NB_LEARNED 1
#define NB_CONFIGURED 2
struct no_bypass_key {
	__u32 addr[4];  /* 16 bytes, IPv4 as ::ffff:a.b.c.d, network byte order words */
	__u32 port;     /* host byte order; 0: every port */
};

/* A splice/sendfile read that found bytes queued or in flight (netaccel_events, a queue the
 * agent drains to reset the connection). The reader socket's 4-tuple as in sock_key. */
struct splice_event {
	__u32 local[4];
	__u32 remote[4];
	__u32 lport;
	__u32 rport;
	__u32 tgid;       /* the reading process and thread */
	__u32 tid;
	__u32 netns_ino;  /* the socket's network namespace (its inode number, as in /proc) */
	__u32 queued;     /* redirected bytes unread at that moment */
	__u32 pending;    /* 1: a redirect may have been in flight */
	__u32 passive;
	__u64 cookie;     /* the reader socket's cookie: the reset must hit exactly it (a lookup by
	                   * 4-tuple alone falls back to the listener once it is closed) */
};

/* A direction that qualified for demotion (netaccel_demote, a queue user space drains): the
 * SENDING socket's sockhash key (its netaccel_peers key, as in sock_key) and cookie.  User
 * space removes that socket from the sockhash once it is safe (node_helper/demote.py). */
struct demote_candidate {
	__u32 local[4];
	__u32 remote[4];
	__u32 lport;
	__u32 rport;
	__u64 cookie;
};

/* Demotions carried out by user space (netaccel_dstat, one array slot, written only by user
 * space under a lock: BPF programs never touch it). */
struct demote_counters {
	__u64 demoted;       /* sockets removed from the sockhash by the policy */
	__u64 abandoned;     /* candidates given up (closed, or never safe within the time limit) */
};

/* Flow control rule 7 (sockmap.c): a sending socket reads the node's TCP memory again after
 * redirecting this many bytes (the guard may be passed by that much per sending socket). */
#define NODE_MEM_RECHECK_BYTES 262144

/* How long a sender's redirect decision may take to reach the receiver's queue: past this,
 * a pending flag is its completed last message, not one in flight (see sockmap.c, SPLICE). */
#define SPLICE_PENDING_GRACE_NS 1000000000ULL

/* ---- VM datapath (tc_redirect.c) ---- */

/* Bridge addresses one device's program passes to the launcher (user space refuses more). */
#define VM_MAX_IP4 4
#define VM_MAX_IP6 4

/* vm_dev_config.flags */
#define VM_F_REDIRECT_PEER 1 /* redirect with bpf_redirect_peer (into the peer's ingress) */
#define VM_F_HAS_MAC 2       /* mac holds the bridge's MAC (frames to it go to the bridge) */

/* Key of both VM maps: a per-device id (1..65535) that user space allocates and writes as the
 * minor of the cls_bpf filter's classid (4e41:<id>); the program reads it back as
 * skb->tc_classid (cls_bpf copies the filter's classid there before running the program;
 * the skb keeps only its low 16 bits). Not (netns cookie, ifindex): bpf_get_netns_cookie(skb)
 * in tc returns the netns of the skb's socket when it has one (a veth keeps the sender's
 * socket across namespaces), not the netns of the device the program runs on. */
struct vm_dev_key {
	__u32 id;
};

/* Per-device configuration (hash map, pinned): where frames go and what is the launcher's.
 * Addresses are in network byte order: the bytes as on the wire, read as __u32 words.
 * (netns_cookie, ifindex) name the device the entry belongs to (ifindexes repeat across
 * namespaces); the program checks ifindex against the device it runs on. */
struct vm_dev_config {
	__u64 netns_cookie;        /* SO_NETNS_COOKIE of the launcher netns */
	__u32 ifindex;             /* the device this entry configures */
	__u32 peer_ifindex;        /* redirect target */
	__u32 flags;               /* VM_F_* */
	__u8 mac[6];               /* the bridge's MAC (with VM_F_HAS_MAC) */
	__u8 n_ip4;                /* used entries of ip4 */
	__u8 n_ip6;                /* used addresses of ip6 (4 words each) */
	__u32 ip4[VM_MAX_IP4];
	__u32 ip6[16];             /* VM_MAX_IP6 addresses x 4 words */
};

/* Per-device counters (per-CPU hash, pinned, same key; user space sums the CPUs). */
struct vm_dev_counters {
	__u64 redirected_packets;  /* to the peer device */
	__u64 redirected_bytes;
	__u64 bridge_packets;      /* passed to the bridge (DHCP, for the launcher) */
	__u64 bridge_bytes;
};

/* ---- node fast path (fastpath.c) ---- */

/* fp_endpoint.flags */
#define FP_F_VM 1  /* the endpoint is a VM behind its virt-launcher pod (for status only) */
#define FP_F_HAS_GW 2  /* gw_mac is known (else routed frames to the endpoint take the kernel path) */

/* An accelerated endpoint's address (netaccel_fp_eps key): 16 bytes, IPv4 as ::ffff:a.b.c.d,
 * network byte order words. */
struct fp_addr_key {
	__u32 addr[4];
};

/* Where frames for that address go (netaccel_fp_eps value). */
struct fp_endpoint {
	__u32 ifindex;   /* the endpoint's node-side veth (node netns): bpf_redirect_peer target */
	__u32 flags;     /* FP_F_* */
	__u8 mac[6];     /* the endpoint's own MAC (a VM's: the guest's), destination of its frames */
	__u8 gw_mac[6];  /* the MAC it knows as its gateway: the source of routed frames to it */
};

/* A configured node-side device (netaccel_fp_cnt key): its ifindex in the node netns. */
struct fp_dev_key {
	__u32 ifindex;
};

/* Per device, what its endpoint sent (per-CPU hash; user space sums the CPUs). */
struct fp_counters {
	__u64 fast_packets;    /* went straight to the destination endpoint */
	__u64 fast_bytes;
	__u64 passed_packets;  /* for an accelerated destination, left to the kernel path */
	__u64 ct_misses;       /* ... because the node's rules have not judged that flow direction
	                        * yet (conntrack: no confirmed entry, or no reply seen) */
	__u64 remote_packets;  /* to an endpoint on another node, handed to the routed device */
	__u64 remote_bytes;
};

#endif
