// SPDX-License-Identifier: GPL-2.0
/*
 * netaccel socket bypass: sock_ops + sk_msg, compiled at run time by bcc
 * (node_helper/sockets.py loads, pins and attaches it).  The two programs are named after
 * the agent instance (node_helper.kernel.instance(), "netaccel" on a node): the loader
 * passes -DNA_PROG_OPS=<instance>_ops -DNA_PROG_MSG=<instance>_msg, and finds them on the
 * cgroup root by those names after a crash.
 *
 *   netaccel_ops  (BPF_PROG_TYPE_SOCK_OPS, cgroup v2 root, BPF_F_ALLOW_MULTI)
 *       On ACTIVE_ESTABLISHED of a TCP socket whose ends are in netaccel_accel
 *       (the accelerated set; one end may be a loopback address), it inserts
 *       the socket into netaccel_socks, keyed by its 4-tuple; on
 *       PASSIVE_ESTABLISHED, an accepted socket is inserted if it pairs with
 *       such a connecting socket (PAIRING), keyed by that socket's 4-tuple
 *       reversed.
 *   netaccel_msg  (BPF_PROG_TYPE_SK_MSG, SK_MSG_VERDICT on netaccel_socks)
 *       Runs on every sendmsg()/sendfile() of a socket in netaccel_socks and
 *       hands the payload straight to the peer socket's receive queue
 *       (bpf_msg_redirect_hash(..., BPF_F_INGRESS)).
 *
 * PAIRING: a connection's two sockets are paired when the accepting one is
 * established, whatever NAT did to the addresses in between.  A service mesh
 * (Istio's REDIRECT rules, docs/mesh.md) makes three pairs per hop out of a
 * pod-to-pod request, and in two of them the two 4-tuples do not mirror each
 * other: the app's socket keeps the original destination while the sidecar's
 * accepted socket sees 127.0.0.1:15001 (outbound), and the outbound sidecar's
 * connection keeps the destination port while the peer's inbound sidecar
 * sees port 15006 (proxy-proxy).  REDIRECT rewrites addresses and ports, never
 * TCP sequence numbers, so:
 *  - A connecting socket X, at ACTIVE_ESTABLISHED, inserts itself under its own
 *    4-tuple and indexes itself in netaccel_active under (its local address,
 *    local port, snd_nxt), with its rcv_nxt.  Both numbers are the handshake's:
 *    snd_nxt = X's initial sequence number + 1, rcv_nxt = the accepting side's
 *    + 1 (ordering rule 1: no data sent yet).
 *  - An accepted socket Y, at PASSIVE_ESTABLISHED, looks up (its remote
 *    address, remote port, rcv_nxt) — its remote end is X's local end, NAT or
 *    not (REDIRECT rewrites the destination only) — and accepts the entry only
 *    if X's rcv_nxt equals Y's snd_nxt.  Y is then inserted under X's 4-tuple
 *    reversed, the key X's sk_msg sends to, and sends to X's 4-tuple; with no
 *    NAT that is Y's own 4-tuple and nothing differs from plain pod-to-pod.
 *    The entry is consumed (deleted), or deleted when X closes unpaired.  An
 *    accepted socket that pairs with nothing is not inserted
 *    (skipped_unpaired): its connecting end is not bypassed or not on this node.
 *  - An aliased Y (key not its own 4-tuple) is also in netaccel_alias (own
 *    4-tuple -> key), for the splice guard, which starts from the socket.
 *  Why it cannot pair the wrong sockets: the index key holds X's local end
 *  (unique on the node for a pod address, up to the rare sharing of an
 *  ephemeral port across destinations; 127.0.0.6 is in every meshed pod) and
 *  X's initial sequence number; the check adds the accepting side's.  Those are two 32-bit numbers the kernel draws per
 *  connection (secure_tcp_seq: keyed hash of the 4-tuple plus a clock), and
 *  each side's is the other's acknowledgement in the handshake, so a wrong
 *  pair would need two other sockets whose handshakes agree on 64 bits.  Two
 *  apps connecting to the same service at once have different local ends and
 *  different sequence numbers; a reused port is a new connection with new
 *  sequence numbers, and the old entry went when its socket closed (cookie
 *  checked); a NAT source-port clash remap (the proxy sees another port) finds
 *  nothing or fails the check.  A connection to a remote node is never
 *  inserted: its remote address is not in the set, so its socket is not
 *  indexed, and the remote's accepted socket is on another node.  Each entry is
 *  inserted with BPF_NOEXIST: a colliding one is left alone, the later socket
 *  then pairs with nothing (no bypass, never a wrong one).
 *  Loopback ends: the outbound sidecar's accepted socket (127.0.0.1:15001) and
 *  the inbound sidecar's connection to the app (from 127.0.0.6, Istio's
 *  inbound passthrough source; ::6 in IPv6) have a loopback end; such a
 *  socket never leaves its namespace, so one loopback end with the other in
 *  the set is accepted.  Both loopback: never.
 *  Ordering (rules 1-4 below) holds for every pair unchanged: X is indexed and
 *  inserted before its final ACK is sent, so Y's PASSIVE_ESTABLISHED (which that
 *  ACK or a later segment triggers) always finds it; each socket is inserted
 *  before its application can send; a message that finds no peer falls back
 *  for good.  The pair's kind (PAIR_* in netaccel_abi.h: pod-pod, outbound,
 *  inbound, proxy-proxy) is decided at pairing and counted per kind.
 *
 * Addresses are normalised to 16 bytes: IPv4 becomes ::ffff:a.b.c.d, so an
 * AF_INET client and the AF_INET6 socket a dual-stack listener accepts for it
 * (local address ::ffff:a.b.c.d) build matching keys, and one LPM trie keyed
 * by 128 bits serves AF_INET, v4-mapped AF_INET6 and native IPv6 (an IPv4
 * prefix a.b.c.d/n is stored as ::ffff:a.b.c.d/(96+n)).  The 4-tuple is not
 * qualified by network namespace (the two ends of a pod-to-pod connection
 * live in different ones), so pod addresses must be unique on the node, as
 * they are in Kubernetes.
 *
 * ORDERING: each direction of a connection is bypassed from its first byte
 * or never.  Direction X->Y is carried by X's sendmsg, so it is X's state
 * that decides, and it only ever moves "bypass -> kernel path", never back.
 *
 *  1. X is inserted only if it has sent no data yet (data_segs_out == 0;
 *     this rules out TCP Fast Open data in the SYN and a TFO server that
 *     wrote before the handshake completed).  Its per-socket state
 *     (netaccel_state, BPF socket-local storage) is created *before* the
 *     insert; if that allocation fails, X is not inserted.
 *  2. X is inserted before its application can send: connect() returns
 *     after ACTIVE_ESTABLISHED ran, accept() returns after
 *     PASSIVE_ESTABLISHED ran (both run under the socket lock in softirq,
 *     before the waiter is woken).  Sockets that existed before the bypass
 *     was enabled never pass through ESTABLISHED again: never bypassed.
 *  3. The first message of X that cannot be redirected (Y not in the map
 *     yet: Y's PASSIVE_ESTABLISHED has not run because the final ACK is
 *     still in a backlog queue, or TCP_DEFER_ACCEPT holds it; or Y was
 *     removed) sets state->fell_back before returning SK_PASS, and every
 *     later message of X sees the flag and takes SK_PASS too.  sendmsg runs
 *     under X's socket lock, so "miss, mark" and the next sendmsg's "read
 *     mark" are serialised; no message can overtake the mark.
 *  4. Bypass -> kernel path is the only switch and it is order-safe: Y's
 *     tcp_bpf recvmsg drains the redirected queue before its TCP receive
 *     queue.  The marks are socket-local storage, so they die with the socket
 *     (no stale mark for a reused 4-tuple, no table that can fill up, and no
 *     BPF_SOCK_OPS_STATE_CB_FLAG callback on every state change of every TCP
 *     socket on the node); the socket leaves netaccel_socks by itself when it
 *     closes (sock_map_close/unhash).  An sk_msg program cannot delete from
 *     a SOCKHASH (verifier: "cannot update sockmap in this context"), which
 *     is why a miss marks the sender instead of removing it.
 *  5. Disable (user space): sock_ops is detached first (no new inserts), then
 *     sk_msg from the sockhash, then everything is unpinned.  That does NOT
 *     switch live connections: each bypassed socket's psock keeps its own
 *     reference to this sk_msg program (detaching only changes the map's
 *     progs), and the program keeps the sockhash (its used maps), so the map
 *     outlives its pins and existing sockets stay bypassed, flow control and
 *     all, until they close; the map goes with the last of them
 *     (tests/kernel/test_bypass_switch.py).  Data already redirected but unread
 *     stays readable because nothing is released.  Known defect
 *     (docs/bypass-kernel.md, "switching with bytes queued"): a reader waiting
 *     while its direction switches with bytes queued was seen to get EAGAIN on
 *     a blocking socket, and a proxy to see end of file early.
 *  On a miss we always return SK_PASS: returning the helper's SK_DROP would
 *  fail the sender's sendmsg with EPERM.
 *
 * FLOW CONTROL: redirected bytes wait on the receiver's psock ingress_msg
 * queue, outside TCP's receive window and the rcvbuf accounting (they are
 * charged to TCP's node-wide memory_allocated, though).  Without a bound a
 * sender to a peer that never reads pushes until the node's tcp_mem hard
 * limit, and then every TCP socket of the node gets ENOMEM.  So before each
 * redirect of X->Y, X's sk_msg checks two things and, if either fails, moves
 * the direction to the kernel path exactly like a miss (rule 3: mark
 * fell_back, return SK_PASS; rule 4: order-safe, Y's recvmsg drains the
 * redirected queue first, and TCP's own flow control takes over from there):
 *
 *  6. Receiver lag: queued + size > max(Y's sk_rcvbuf, rcv_floor_bytes), where
 *     queued is Y's psock->msg_tot_len (exact count of redirected, unread
 *     bytes, kept by the kernel) and size the message at hand.  That is about
 *     what the kernel path would hold for Y; the floor (a few MB, a setting)
 *     stands in for receive-buffer autotuning, which does not run for data
 *     that never passes TCP's receive path.  Only X redirects to Y.  X's
 *     verdict runs under X's socket lock; tcp_bpf_send_verdict() releases it
 *     for the redirect itself and takes it again before X's next message, so
 *     a thread's next check sees its previous message queued.  Threads that
 *     send on X at once can each have one message between check and queue:
 *     the bound is exceeded by at most one message per such thread.  Y's
 *     reader only shrinks the count.
 *  7. Node memory: TCP's memory_allocated (pages, what /proc/net/sockstat
 *     calls "mem") > node_mem_limit_pages, which the loader derives from
 *     net.ipv4.tcp_mem (default: half of tcp_mem[0], the pressure threshold,
 *     so the bypass never drives the node into pressure).  Data then takes
 *     TCP, whose pressure handling and windows bound it.
 *  The checks decide "bypass or kernel path"; the sockhash lookup of the
 *  redirect still alone decides *which* socket gets the data, so a wrong
 *  read can cause a spurious fallback, never misdelivery.  Each moved
 *  direction is counted once by reason (fallback_dirs: miss,
 *  fallback_dirs_rcv_lag, fallback_dirs_node_mem).
 *
 * KERNEL OFFSETS: the checks read kernel-internal fields (sock.sk_user_data,
 * sock.sk_rcvbuf, sock.__sk_common.skc_prot, sk_psock.msg_tot_len,
 * proto.memory_allocated).  bcc compiles against whatever header set is
 * installed, which on our nodes is often older than the running kernel
 * (Debian 6.1 headers on 6.18), so offsetof() from headers would be wrong.
 * The loader reads the offsets from the running kernel's BTF
 * (node_helper/btf.py, /sys/kernel/btf/vmlinux) and passes them as NA_OFF_*
 * macros; a member missing from BTF refuses the whole bypass (no half-working
 * start), and this file does not compile without them.  Every such read is a
 * bpf_probe_read_kernel (fault-safe); sk_msg/sock_ops cannot dereference the
 * peer's struct sock otherwise.
 *
 * RACES:
 *  - Stale peer address: netaccel_peers maps Y's 4-tuple to Y's struct sock
 *    address and cookie.  sock_ops stores it at insert (before the sockhash
 *    insert, so "in the sockhash" implies "in netaccel_peers"), enables
 *    BPF_SOCK_OPS_STATE_CB only for inserted sockets, and deletes the entry
 *    when Y reaches TCP_CLOSE if the cookie is still Y's.  X may read Y's
 *    fields after Y closed (entry looked up just before the delete) or after
 *    the memory was reused: the read is fault-safe, a failed read counts as
 *    a miss, garbage can at worst move X to TCP (spurious fallback, still
 *    order-safe), and the redirect itself then misses anyway.
 *  - msg_tot_len is read without Y's psock lock: a concurrent read by Y only
 *    makes the count smaller than the value read (conservative).
 *  - memory_allocated is approximate (per-CPU reserves of up to 1 MB are
 *    folded in lazily), which the margin below pressure absorbs.
 *
 * SPLICE: splice(2) and sendfile(2) read a TCP socket through tcp_splice_read(), which only
 * sees the TCP receive queue, never the psock queue the redirected bytes wait on (why, and
 * what else was tried: docs/bypass-kernel.md).  A reader that splices a bypassed socket would
 * hang or see a short stream.  The guard:
 *  8. Tracepoint programs (syscalls:sys_enter_splice on fd_in, sys_enter_sendfile64 on
 *     in_fd, and sys_enter_recvfrom/recvmsg with MSG_WAITALL, which tcp_bpf answers with
 *     what is queued instead of waiting for all) resolve the fd to its struct sock (fault-safe reads, offsets from BTF) and find
 *     the socket's own netaccel_peers entry (its 4-tuple, and the same sock address).  They
 *     run before the kernel reads the socket.
 *  9. A handshake with the socket's only sender (Dekker's: each side writes its flag, then
 *     an atomic operation orders that write before its read of the other side's flag, so at
 *     least one side sees the other): the sender sets `pending`, then reads `splice_block`
 *     and falls back (rule 3, reason splice) if it is set; the reader sets `splice_block`,
 *     then reads `pending` and the socket's queued bytes (psock->msg_tot_len).
 *     - nothing queued and nothing pending: every byte the sender sends from now on takes
 *       TCP, which splice reads; nothing was redirected that splice cannot see.  Safe.
 *       (MSG_WAITALL: also safe when the queue holds all the bytes asked for.  When it
 *       holds fewer, that one read returns early with them, as tcp_bpf_recvmsg does and a
 *       tracepoint cannot change; later reads come from TCP, in full.  No reset there:
 *       the stream stays intact and callers that loop do not notice.)
 *     - otherwise bytes are (or may soon be) queued where splice cannot read them, and TCP
 *       bytes sent after them would overtake them: the connection cannot be saved.  The
 *       entry is marked `doomed`: the sender's further messages are refused (SK_DROP: its
 *       sendmsg fails) and an event asks user space (node_helper/splice_guard.py) to reset
 *       the connection with SOCK_DESTROY, so both applications see an error at once
 *       instead of a hang or a premature end of file.
 *     `pending` is cleared by the sender's next verdict (its previous redirect has been
 *     queued by then: that sendmsg returned, and a socket's sendmsg calls are serialised
 *     by its lock) and is ignored once older than SPLICE_PENDING_GRACE_NS, the time a
 *     decided redirect may take to reach the queue (a few function calls in the sender's
 *     own system call; 1 s covers CPU throttling).  Limits: several threads sending on one
 *     socket at once can each have a redirect in flight that `pending` does not cover;
 *     io_uring's splice passes none of these tracepoints (rule 8b, at the end of this file,
 *     sees it, except from a registered file); and when the sender had already
 *     moved to TCP (rules 3, 6, 7) with bytes still queued, TCP bytes already in the
 *     receive queue are read by that first splice before the reset arrives: splice cannot
 *     be made to wait for the queue, nor failed, from a tracepoint (no fentry/LSM here).
 * 10. The reader's workload leaves the bypass: its address and local port (an accepted
 *     socket) or its address (a connecting one) go into netaccel_nobypass, which sock_ops
 *     checks before inserting, so later connections of that workload run on TCP from their
 *     first byte.  The agent may configure entries too (a per-pod opt-out).
 *
 * DEMOTION (issue 10): the kernel path coalesces small writes (Nagle, autocork) and the bypass
 * cannot: each sendmsg is one message, one verdict, one queue entry and one wake-up.  A
 * direction that streams small messages one-way is faster on TCP (measured: 1 B 0.21-0.28x,
 * 256 B 0.86x on the bypass).  Returning SK_PASS while staying in the sockhash recovers only
 * half (tcp_bpf still runs per send); the socket has to leave the sockhash.
 * 11. Policy, in X's sk_msg (it sees every message, no polling lag): a run of
 *     cfg.demote_msgs messages of X, each < cfg.demote_small_bytes, with no message of Y in
 *     between (Y's sk_msg counts its messages in X's netaccel_peers entry, in_msgs), within
 *     cfg.demote_window_ns, qualifies X->Y.  Request/response never builds a run, a large
 *     message ends it, a trickle is too slow for the window.  Only user space and sock_ops may
 *     delete from a SOCKHASH (not sk_msg, not tracepoints; sock_ops runs on no event of a
 *     bypassed socket, which sends no TCP segments), so the removal is user space's
 *     (node_helper/demote.py, polling every 50 ms); the kernel queues a candidate
 *     (netaccel_demote), so user space never scans the sockets.
 *     Which socket leaves: X, the sender.  Measured on this kernel (one delete, not the map's
 *     release): removing a socket drops its psock, and bytes redirected to it but unread are
 *     LOST (200 000 queued bytes: the reader saw only the TCP bytes sent after them).  The
 *     receiver Y keeps its psock, so X's bytes already redirected stay on Y's queue and Y's
 *     tcp_bpf recvmsg drains them before TCP's receive queue (rule 4): X->Y is order-safe
 *     whatever X is doing (a sendmsg of X in progress holds X's psock and completes its
 *     redirect into Y's queue; X's next sendmsg finds tcp_prot restored and takes TCP).  But
 *     X's own psock is the receive queue of Y->X: it must be empty, and stay empty, when X
 *     leaves.  So X qualifies in three steps:
 *      a. X's sk_msg sets `demoted` in its own entry (atomic exchange) and queues X.  Y's
 *         sk_msg, after its exchange of `pending` (rule 9's handshake), reads `demoted` and
 *         moves Y->X to TCP (rule 3, counted fallback_dirs_demote): order-safe while X is
 *         still in the sockhash.  Dekker as in rule 9: either Y sees `demoted`, or user space
 *         sees Y's `pending` (its write came first).
 *      b. User space waits until no redirect of Y into X is in flight: `pending` clear, or
 *         older than SPLICE_PENDING_GRACE_NS (rule 9's meaning), and takes the time T.
 *         From then on nothing enters X's queue.
 *      c. X's sk_msg, on each later message, reads its own psock's msg_tot_len and, when 0,
 *         stores the time (taken before the read) as `drained_ts`.  When user space sees
 *         drained_ts > T (twice), the queue was empty after b, so it is empty for good; it
 *         deletes X's key (the cookie checked just before: not a reused 4-tuple).
 *     If X stops sending or never reads what Y sent, c never holds: the candidate is
 *     abandoned after 30 s, X stays bypassed and Y->X on TCP (both order-safe).
 *      d. The survivor leaves too.  Y, moved to TCP by X's `demoted` (step a), qualifies
 *         itself the same way (fall_back_and_leave): its own entry says `demoted`, so X's
 *         next redirect takes TCP (X->Y is then order-safe by rule 4: X's earlier bytes wait
 *         in Y's queue), and Y is a candidate under the same steps b-c: it is deleted only
 *         once its own queue, X's last redirected bytes, was seen empty after no redirect of
 *         X was in flight.  Why: a socket left in the sockhash with both directions on TCP
 *         still reads through tcp_bpf_recvmsg, which waits once and returns EAGAIN on a
 *         wake-up that finds no data (the socket's own TCP sends wake its wait queue), even
 *         on a blocking socket (docs/bypass-kernel.md, "switching with bytes queued"); out
 *         of the sockhash its reads are tcp_recvmsg's.  Y reports its queue only while it
 *         sends (its sk_msg runs then): a Y that never sends again stays, as before.
 *     A demoted socket never returns: it passed ESTABLISHED once (rule 2); its storage keeps
 *     `demoting`, its entry `demoted`.
 *     Limits: a 4-tuple reused between the cookie check and the delete (microseconds) would
 *     remove the new socket; a reader that splices Y within 1 s of X's removal sees X's
 *     last `pending` (X never runs a verdict again to clear it) and is reset, not corrupted.
 *     Policy "always" (demote_msgs 0) never qualifies anything.
 *
 * PER-MESSAGE COST: what the verdict does on every message is decided once where it can be
 * and kept in X's socket storage: the peer's psock address (Y's psock lives as long as Y is in
 * the sockhash and Y never returns; a stale address is read fault-safe, like pv->sk above, and
 * the redirect then misses).  Rule 9 costs one atomic exchange per redirected message (it
 * cost three): `pending` is set before each redirect and stays 1 while X keeps redirecting
 * (it is cleared when X falls back, i.e. only when X stops redirecting), and `splice_block`
 * / `demoted` are plain loads after the exchange, which is a full barrier (x86 lock xchg;
 * arm64 swpal).  The demotion watch costs nothing for messages >= demote_small_bytes and, for
 * smaller ones, a lookup of our own entry at the first and the last message of a run (not
 * per message).  Flow control reads the peer's queue and the node's TCP memory when the
 * credit of the last read is used up (rules 6 and 7), not per message.  Measured with
 * kernel.bpf_stats_enabled (docs/results, "the large-message gap"): 550-590 ns a message
 * before these two changes, the profile behind them there too.
 */
#include <uapi/linux/bpf.h>

#include "netaccel_abi.h"  /* struct sock_key, lpm_key, bypass_counters */

#ifndef NA_PROG_OPS
#define NA_PROG_OPS netaccel_ops
#endif
#ifndef NA_PROG_MSG
#define NA_PROG_MSG netaccel_msg
#endif
#ifndef NA_PROG_SPLICE
#define NA_PROG_SPLICE netaccel_splice
#endif
#ifndef NA_PROG_SENDFILE
#define NA_PROG_SENDFILE netaccel_sendf
#endif
#ifndef NA_PROG_RECVFROM
#define NA_PROG_RECVFROM netaccel_rvf
#endif
#ifndef NA_PROG_RECVMSG
#define NA_PROG_RECVMSG netaccel_rvm
#endif
/* io_uring splice (rule 8b) and SO_ZEROCOPY (rule 12), at the end of this file */
#ifndef NA_PROG_URING
#define NA_PROG_URING netaccel_uring
#endif
#ifndef NA_PROG_SETSOCKOPT
#define NA_PROG_SETSOCKOPT netaccel_sso
#endif

#define NA_AF_INET 2
#define NA_AF_INET6 10
#define NA_TCP_CLOSE 7                /* BPF_TCP_CLOSE */
#define NA_SK_USER_DATA_PSOCK 4UL     /* include/net/sock.h: sk_user_data is a psock */
#define NA_SK_USER_DATA_PTRMASK (~7UL)

/* Kernel-internal offsets from the running kernel's BTF (see KERNEL OFFSETS). */
#if !defined(NA_OFF_SK_USER_DATA) || !defined(NA_OFF_SK_RCVBUF) || \
    !defined(NA_OFF_SKC_PROT) || !defined(NA_OFF_PSOCK_MSG_TOT_LEN) || \
    !defined(NA_OFF_PROTO_MEMORY_ALLOCATED)
#error "the loader passes NA_OFF_* kernel offsets read from BTF (node_helper/btf.py)"
#endif
#if !defined(NA_OFF_TASK_FILES) || !defined(NA_OFF_FILES_FDT) || !defined(NA_OFF_FDT_FD) || \
    !defined(NA_OFF_FDT_MAX_FDS) || !defined(NA_OFF_FILE_PRIVATE_DATA) || \
    !defined(NA_OFF_SOCKET_FILE) || !defined(NA_OFF_SOCKET_SK) || !defined(NA_OFF_SKC_FAMILY) || \
    !defined(NA_OFF_SKC_RCV_SADDR) || !defined(NA_OFF_SKC_DADDR) || !defined(NA_OFF_SKC_NUM) || \
    !defined(NA_OFF_SKC_DPORT) || !defined(NA_OFF_SKC_V6_RCV_SADDR) || \
    !defined(NA_OFF_SKC_V6_DADDR) || !defined(NA_OFF_SKC_NET) || !defined(NA_OFF_NET_NS_INUM)
#error "the loader passes the splice guard's NA_OFF_* offsets read from BTF"
#endif

/* Why a direction left the bypass (conn_state.reason, for diagnosis). */
#define FB_MISS 1
#define FB_RCV_LAG 2
#define FB_NODE_MEM 3
#define FB_SPLICE 4
#define FB_DEMOTE 5   /* the socket this direction sends into is leaving (DEMOTION) */
#define FB_ZEROCOPY 6 /* the sender set SO_ZEROCOPY (rule 12) */

/* The verifier only accepts context accesses at a constant offset from the
 * unmodified ctx pointer.  If two fields are read into one variable on
 * different branches, clang may merge them into "ctx + variable offset"
 * ("dereference of modified ctx ptr").  A volatile load through the field's
 * own address forces one plain load per field. */
#define CTX_U32(ctx, field) (*(volatile __u32 *)&((ctx)->field))

/* remote_port holds the port in network byte order in the upper 16 bits on
 * little-endian machines (sock_ops and sk_msg alike); local_port is host
 * order.  Both are stored in host order so that one socket's remote port
 * equals its peer's local port. */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define REMOTE_PORT(v) (__builtin_bswap32(v))
#else
#define REMOTE_PORT(v) (v)
#endif

/* Per-socket bypass state, created by sock_ops before the insert. */
struct conn_state {
	__u32 fell_back;  /* 1 once a message of this socket took the kernel path */
	__u32 reason;     /* FB_*: why */
	__u32 in_peers;   /* 1 while this socket's netaccel_peers entry is ours */
	__u32 pad;
	__u64 sk;         /* this socket's struct sock address, as a plain number */
	__u64 mem_addr;   /* &sk->sk_prot->memory_allocated->counter (TCP's, node-wide) */
	__u64 cookie;
	struct sock_key key;   /* our sockhash and netaccel_peers key (PAIRING: the key the peer
	                        * sends to; for an aliased socket not our own 4-tuple) */
	struct sock_key peer;  /* the peer's key: where our messages go (key, reversed) */
	struct sock_key own;   /* our own 4-tuple (the netaccel_alias key of an aliased socket) */
	__u32 seq;             /* active: snd_nxt at ESTABLISHED (our netaccel_active key) */
	__u32 indexed;         /* active: our netaccel_active entry may still be there */
	__u32 aliased;         /* passive: our netaccel_alias entry is there */
	__u32 pad1;
	/* Decided once per peer and kept (see PER-MESSAGE COST): the peer's psock address. */
	__u64 peer_psock;
	/* Flow control credits (PER-MESSAGE COST): bytes we may still redirect before reading the
	 * peer's queue (rule 6) or the node's TCP memory (rule 7) again. */
	__u64 credit;
	__u64 mem_credit;
	/* DEMOTION: this direction's current run of small messages. */
	__u64 peer_seen;      /* our entry's in_msgs (the peer's messages) at our last small one */
	__u64 streak_start;   /* bpf_ktime_get_ns() at the run's first message */
	__u32 streak;         /* small messages in a row; the peer's silence is checked at the run's
	                       * ends (its in_msgs then, against peer_seen at the start) */
	__u32 demoting;       /* 1: qualified; our entry says `demoted`; user space removes us */
	__u32 cand_queued;    /* 1: our candidate entry is in netaccel_demote */
	__u32 pad2;
};

BPF_SOCKHASH(netaccel_socks, struct sock_key, 65536);
BPF_LPM_TRIE(netaccel_accel, struct lpm_key, __u32, 4096);
BPF_PERCPU_ARRAY(netaccel_cnt, struct bypass_counters, 1);
BPF_SK_STORAGE(netaccel_state, struct conn_state);
BPF_ARRAY(netaccel_cfg, struct bypass_config, 1);
BPF_F_TABLE("hash", struct sock_key, struct peer_sock, netaccel_peers, 65536, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct no_bypass_key, __u32, netaccel_nobypass, 16384, BPF_F_NO_PREALLOC);
BPF_QUEUE(netaccel_events, struct splice_event, 1024);
BPF_QUEUE(netaccel_demote, struct demote_candidate, 1024);
BPF_ARRAY(netaccel_dstat, struct demote_counters, 1);  /* user space's; declared here to pin */

/* PAIRING.  Only the programs use these two maps (not pinned: the programs hold them). */
struct active_key {   /* a connecting socket: its local end and first unsent sequence number */
	__u32 addr[4];
	__u32 port;
	__u32 seq;        /* snd_nxt at ACTIVE_ESTABLISHED: its initial sequence number + 1 */
};
struct active_val {
	struct sock_key key;  /* the connecting socket's own 4-tuple (= its sockhash key) */
	__u64 cookie;
	__u32 rcv_nxt;        /* at ACTIVE_ESTABLISHED: the accepting end's ISN + 1 */
	__u32 pad;
};
BPF_F_TABLE("hash", struct active_key, struct active_val, netaccel_active, 65536,
	    BPF_F_NO_PREALLOC);
/* An aliased (REDIRECTed, accepted) socket's own 4-tuple -> its sockhash key, for the splice
 * guard, which starts from a socket's own addresses. */
BPF_F_TABLE("hash", struct sock_key, struct sock_key, netaccel_alias, 65536, BPF_F_NO_PREALLOC);

/* Copy the eight IPv6 address words of ctx.  Clang happily merges a load of
 * local_ip4 on one branch and of local_ip6[3] on the other into one load
 * from "ctx + phi(offset)", which the verifier rejects even through volatile.
 * An empty asm with the value as an in/out operand pins each load to its
 * own branch with its own constant offset. */
#define PIN(v) asm volatile("" : "+r"(v))
#define READ_ADDRS(ctx, loc, rem)                                           \
	do {                                                                \
		__u32 l0 = CTX_U32(ctx, local_ip6[0]), l1 = CTX_U32(ctx, local_ip6[1]);   \
		__u32 l2 = CTX_U32(ctx, local_ip6[2]), l3 = CTX_U32(ctx, local_ip6[3]);   \
		__u32 r0 = CTX_U32(ctx, remote_ip6[0]), r1 = CTX_U32(ctx, remote_ip6[1]); \
		__u32 r2 = CTX_U32(ctx, remote_ip6[2]), r3 = CTX_U32(ctx, remote_ip6[3]); \
		PIN(l0); PIN(l1); PIN(l2); PIN(l3);                         \
		PIN(r0); PIN(r1); PIN(r2); PIN(r3);                         \
		(loc)[0] = l0; (loc)[1] = l1; (loc)[2] = l2; (loc)[3] = l3; \
		(rem)[0] = r0; (rem)[1] = r1; (rem)[2] = r2; (rem)[3] = r3; \
	} while (0)

/* IPv4 addresses as IPv4-mapped IPv6 (::ffff:a.b.c.d), network byte order. */
static __always_inline void fill_v4(struct sock_key *k, __u32 local, __u32 remote)
{
	PIN(local);
	PIN(remote);
	k->local[2] = __builtin_bswap32(0xffff);
	k->local[3] = local;
	k->remote[2] = __builtin_bswap32(0xffff);
	k->remote[3] = remote;
}

static __always_inline int in_set(__u32 *a)
{
	struct lpm_key k = {.prefixlen = 128, .addr = {a[0], a[1], a[2], a[3]}};
	return netaccel_accel.lookup(&k) != NULL;
}

/* PAIRING: an address that stays inside its network namespace: 127.0.0.0/8 (also as
 * ::ffff:127.x.y.z), ::1, and ::6 (Istio's IPv6 source for its inbound passthrough, an address
 * it adds to lo).  Words are in network byte order. */
static __always_inline int is_loopback(__u32 *a)
{
	if (a[0] || a[1])
		return 0;
	if (a[2] == __builtin_bswap32(0xffff))
		return (__builtin_bswap32(a[3]) >> 24) == 127;
	return !a[2] && (a[3] == __builtin_bswap32(1) || a[3] == __builtin_bswap32(6));
}

static __always_inline void reverse_key(struct sock_key *out, struct sock_key *in)
{
	__builtin_memcpy(out->local, in->remote, 16);
	__builtin_memcpy(out->remote, in->local, 16);
	out->lport = in->rport;
	out->rport = in->lport;
}

static __always_inline int same_end(__u32 *a, __u32 ap, __u32 *b, __u32 bp)
{
	return ap == bp && a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

/* Read a kernel word at addr (a plain number): 0 when the read faults. */
static __always_inline __u64 kread_u64(__u64 addr, int *err)
{
	__u64 v = 0;

	if (bpf_probe_read_kernel(&v, sizeof(v), (void *)addr) != 0)
		*err = 1;
	return v;
}

static __always_inline __u32 kread_u32(__u64 addr, int *err)
{
	__u32 v = 0;

	if (bpf_probe_read_kernel(&v, sizeof(v), (void *)addr) != 0)
		*err = 1;
	return v;
}

static __always_inline __u16 kread_u16(__u64 addr, int *err)
{
	__u16 v = 0;

	if (bpf_probe_read_kernel(&v, sizeof(v), (void *)addr) != 0)
		*err = 1;
	return v;
}

/* Rule 10: is (addr, port) or (addr, every port) a workload the bypass leaves alone? */
static __always_inline int no_bypass(__u32 *addr, __u32 port)
{
	struct no_bypass_key k = {.addr = {addr[0], addr[1], addr[2], addr[3]}, .port = port};

	if (netaccel_nobypass.lookup(&k))
		return 1;
	k.port = 0;
	return netaccel_nobypass.lookup(&k) != NULL;
}

/* STATE_CB (only enabled for our inserted sockets): on close, drop the
 * socket's netaccel_peers entry if it is still this socket's. */
static __always_inline int on_state(struct bpf_sock_ops *skops)
{
	struct peer_sock *pv;
	struct conn_state *st;
	struct bpf_sock *sk;

	if (CTX_U32(skops, args[1]) != NA_TCP_CLOSE)
		return 1;
	sk = skops->sk;
	if (!sk)
		return 1;
	st = netaccel_state.sk_storage_get(sk, 0, 0);
	if (!st || !st->in_peers)
		return 1;
	pv = netaccel_peers.lookup(&st->key);
	if (pv && pv->cookie == st->cookie)
		netaccel_peers.delete(&st->key);
	st->in_peers = 0;
	if (st->aliased) {
		netaccel_alias.delete(&st->own);
		st->aliased = 0;
	}
	if (st->indexed) {  /* never paired: nobody consumed our index entry */
		struct active_key ak = {.port = st->own.lport, .seq = st->seq};
		struct active_val *av;

		__builtin_memcpy(ak.addr, st->own.local, 16);
		av = netaccel_active.lookup(&ak);
		if (av && av->cookie == st->cookie)
			netaccel_active.delete(&ak);
		st->indexed = 0;
	}
	return 1;
}

/* PAIRING: an accepted socket finds the connecting socket it belongs to.  The connecting
 * socket indexed itself at its ACTIVE_ESTABLISHED under its local end and first sequence
 * number; the accepted socket looks that up with its remote end and rcv_nxt, and checks the
 * other half of the handshake (the connecting side's rcv_nxt is our snd_nxt).  0: no such
 * socket (not bypassed, or not on this node).  Consumes the index entry. */
static __always_inline int find_active(struct bpf_sock_ops *skops, struct sock_key *own,
				       struct active_val *out)
{
	struct active_key ak = {.port = own->rport, .seq = CTX_U32(skops, rcv_nxt)};
	struct active_val *av;

	__builtin_memcpy(ak.addr, own->remote, 16);
	av = netaccel_active.lookup(&ak);
	if (!av || av->rcv_nxt != CTX_U32(skops, snd_nxt))
		return 0;
	__builtin_memcpy(out, av, sizeof(*out));
	netaccel_active.delete(&ak);
	return 1;
}

/* PAIRING: which hop of a request the pair (connecting end a, accepting end p) carries. */
static __always_inline __u32 pair_kind(struct sock_key *a, struct sock_key *p)
{
	if (is_loopback(a->local))
		return PAIR_INBOUND;
	if (is_loopback(p->local))
		return PAIR_OUTBOUND;
	if (!same_end(p->local, p->lport, a->remote, a->rport))
		return PAIR_PROXY_PROXY;
	return PAIR_POD_POD;
}

int NA_PROG_OPS(struct bpf_sock_ops *skops)
{
	__u32 op = CTX_U32(skops, op);
	struct sock_key own = {}, key = {};
	struct active_val act = {};
	struct active_key ak = {};
	struct peer_sock pv = {};
	struct bypass_counters *cnt;
	struct conn_state *st;
	struct peer_sock *apv;
	struct bpf_sock *sk;
	__u64 sk_addr, prot, mem;
	__u32 zero = 0, kind = PAIR_POD_POD;
	__u32 family, passive;
	int rerr = 0;
	long err;

	if (op == BPF_SOCK_OPS_STATE_CB)
		return on_state(skops);
	if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	passive = op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB;

	family = CTX_U32(skops, family);
	if (family == NA_AF_INET) {
		fill_v4(&own, CTX_U32(skops, local_ip4), CTX_U32(skops, remote_ip4));
	} else if (family == NA_AF_INET6) {
		READ_ADDRS(skops, own.local, own.remote);
	} else {
		return 1;
	}

	cnt = netaccel_cnt.lookup(&zero);
	if (!cnt)
		return 1;
	/* One end in the accelerated set, the other in it too or a loopback address (PAIRING:
	 * a connection from or to loopback never leaves its namespace). */
	if (!(in_set(own.local) && (in_set(own.remote) || is_loopback(own.remote))) &&
	    !(in_set(own.remote) && is_loopback(own.local))) {
		cnt->skipped_not_in_set++;
		return 1;
	}
	/* Ordering rule 1: a socket that already sent data is never inserted. */
	if (CTX_U32(skops, data_segs_out) != 0) {
		cnt->skipped_sent_data++;
		return 1;
	}
	own.lport = CTX_U32(skops, local_port);
	own.rport = REMOTE_PORT(CTX_U32(skops, remote_port));
	/* Rule 10: a workload that splices (learned) or opted out (configured). */
	if (no_bypass(own.local, own.lport)) {
		cnt->skipped_no_bypass++;
		return 1;
	}
	/* PAIRING: a connecting socket is keyed by its own 4-tuple; an accepted one by the
	 * connecting socket's 4-tuple reversed, the key that socket sends to. */
	if (passive) {
		if (!find_active(skops, &own, &act)) {
			cnt->skipped_unpaired++;
			return 1;
		}
		reverse_key(&key, &act.key);
		kind = pair_kind(&act.key, &own);
	} else {
		__builtin_memcpy(&key, &own, sizeof(key));
	}

	sk = skops->sk;
	if (!sk) {
		cnt->insert_errors++;
		return 1;
	}
	/* State first: sk_msg then only reads it (no allocation on the hot
	 * path, nothing there that can fail after a socket is inserted). */
	st = netaccel_state.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		cnt->insert_errors++;
		return 1;
	}
	st->fell_back = 0;
	st->reason = 0;
	st->in_peers = 0;
	st->indexed = 0;
	st->aliased = 0;
	st->peer_psock = 0;
	st->credit = 0;
	st->mem_credit = 0;
	st->peer_seen = 0;
	st->streak = 0;
	st->demoting = 0;
	st->cand_queued = 0;
	/* The socket's address as a number: stored through the map value and
	 * loaded back, it is a scalar the program may add offsets to (the
	 * verifier forbids arithmetic on the socket pointer itself). */
	st->sk = (__u64)sk;
	sk_addr = *(volatile __u64 *)&st->sk;
	prot = kread_u64(sk_addr + NA_OFF_SKC_PROT, &rerr);
	mem = prot ? kread_u64(prot + NA_OFF_PROTO_MEMORY_ALLOCATED, &rerr) : 0;
	if (rerr || !mem) {  /* no node guard for it: do not bypass it */
		cnt->insert_errors++;
		return 1;
	}
	st->mem_addr = mem;
	st->cookie = bpf_get_socket_cookie(skops);
	__builtin_memcpy(&st->key, &key, sizeof(key));
	reverse_key(&st->peer, &key);
	__builtin_memcpy(&st->own, &own, sizeof(own));
	st->seq = CTX_U32(skops, snd_nxt);
	/* Peer entry before the sockhash insert: a socket in the sockhash always
	 * has one, so the sender's "no entry" is a miss like a sockhash miss.
	 * Both BPF_NOEXIST: a duplicate 4-tuple (same addresses in two
	 * namespaces) is left alone rather than stealing the other's slot. */
	pv.sk = sk_addr;
	pv.cookie = st->cookie;
	pv.passive = passive;
	pv.kind = kind;
	if (netaccel_peers.insert(&key, &pv) != 0) {
		cnt->insert_errors++;
		return 1;
	}
	if (passive && !same_end(own.local, own.lport, key.local, key.lport)) {
		if (netaccel_alias.insert(&own, &key) != 0)
			goto undo_peers;
		st->aliased = 1;
	}
	if (passive) {
		/* The connecting socket's entry learns the pair's kind before we can be found
		 * in the sockhash, so its first redirect to us is counted under it. */
		apv = netaccel_peers.lookup(&act.key);
		if (apv && apv->cookie == act.cookie)
			apv->kind = kind;
	}
	err = netaccel_socks.sock_hash_update(skops, &key, BPF_NOEXIST);
	if (err != 0)
		goto undo_alias;
	st->in_peers = 1;
	if (passive) {
		cnt->pairs[kind & (PAIR_KINDS - 1)]++;
	} else {
		/* Index last: an accepted socket can only pair with an inserted one. */
		__builtin_memcpy(ak.addr, own.local, 16);
		ak.port = own.lport;
		ak.seq = st->seq;
		__builtin_memcpy(&act.key, &own, sizeof(own));
		act.cookie = st->cookie;
		act.rcv_nxt = CTX_U32(skops, rcv_nxt);
		if (netaccel_active.insert(&ak, &act) == 0)
			st->indexed = 1;
	}
	/* Keep whatever flags other programs set; add the close callback. */
	bpf_sock_ops_cb_flags_set(skops, CTX_U32(skops, bpf_sock_ops_cb_flags) |
					 BPF_SOCK_OPS_STATE_CB_FLAG);
	cnt->inserted++;
	return 1;

undo_alias:
	if (st->aliased) {
		netaccel_alias.delete(&own);
		st->aliased = 0;
	}
undo_peers:
	netaccel_peers.delete(&key);
	cnt->insert_errors++;
	return 1;
}

/* Ordering rule 3: mark first, then this and every later message of this
 * socket takes TCP.  Counted once per direction, by reason. */
static __always_inline int fall_back(struct conn_state *st, struct bypass_counters *cnt,
				     struct peer_sock *pv, __u32 reason)
{
	/* Rule 9: no redirect of ours is in flight any more (see PER-MESSAGE COST). */
	if (pv && pv->pending)
		__sync_lock_test_and_set(&pv->pending, 0);
	st->fell_back = 1;
	st->reason = reason;
	if (reason == FB_RCV_LAG)
		cnt->fallback_dirs_rcv_lag++;
	else if (reason == FB_NODE_MEM)
		cnt->fallback_dirs_node_mem++;
	else if (reason == FB_SPLICE)
		cnt->fallback_dirs_splice++;
	else if (reason == FB_DEMOTE)
		cnt->fallback_dirs_demote++;
	else if (reason == FB_ZEROCOPY)
		cnt->fallback_dirs_zerocopy++;
	else
		cnt->fallback_dirs++;
	cnt->fallback_msgs++;
	return SK_PASS;
}

/* DEMOTION: ask user space (node_helper/demote.py) to remove this socket from the sockhash. */
static __always_inline void queue_candidate(struct conn_state *st)
{
	struct demote_candidate cand = {};

	__builtin_memcpy(cand.local, st->key.local, 16);
	__builtin_memcpy(cand.remote, st->key.remote, 16);
	cand.lport = st->key.lport;
	cand.rport = st->key.rport;
	cand.cookie = st->cookie;
	if (netaccel_demote.push(&cand, 0) == 0)
		st->cand_queued = 1;
}

/* DEMOTION: qualified.  Close the way into us first (the peer's next verdict takes TCP,
 * rule 3; the exchange pairs with the peer's exchange of `pending`, rule 9's handshake), then
 * ask user space to remove us once nothing can be stranded in our queue. */
static __always_inline void demote_self(struct conn_state *st, struct peer_sock *own,
					struct bypass_counters *cnt)
{
	st->demoting = 1;
	__sync_lock_test_and_set(&own->demoted, 1);
	cnt->demote_candidates++;
	queue_candidate(st);
}

/* Rules 6-7 and DEMOTION: a direction that flow control moved to TCP would otherwise stay in
 * the sockhash, every message paying the sk_msg machinery on its way to TCP (measured 0.85x
 * of the kernel path at 16 KiB).  Unless the policy is "always", it asks to leave the
 * sockhash like a qualified stream, under the same order conditions (rule 11). */
static __always_inline int fall_back_and_leave(struct conn_state *st, struct bypass_config *cfg,
					       struct bypass_counters *cnt, struct peer_sock *pv,
					       __u32 reason)
{
	struct peer_sock *own;

	if (cfg->demote_msgs && !st->demoting) {
		own = netaccel_peers.lookup(&st->key);
		if (own && own->cookie == st->cookie)
			demote_self(st, own, cnt);
	}
	return fall_back(st, cnt, pv, reason);
}

/* DEMOTION: a run of small messages with no message of the peer between them.  Large
 * messages end the run at no cost; a small one costs one lookup of our own entry (the peer's
 * sk_msg counts its messages there) and, at the run's ends, a clock read. */
static __always_inline void demote_watch(struct conn_state *st, struct bypass_config *cfg,
					 struct bypass_counters *cnt, __u32 size)
{
	struct peer_sock *own;
	__u64 seen, now;

	if (size >= cfg->demote_small_bytes) {
		st->streak = 0;
		return;
	}
	/* The peer's message count (in_msgs) only grows, so "no message of the peer during the
	 * run" is "the same count at its first and its last message": our own entry is looked up
	 * at the run's ends only, not per message (PER-MESSAGE COST). */
	if (st->streak == 0) {
		own = netaccel_peers.lookup(&st->key);
		if (!own || own->cookie != st->cookie)
			return;
		st->peer_seen = own->in_msgs;
		st->streak_start = bpf_ktime_get_ns();
	}
	if (++st->streak < cfg->demote_msgs)
		return;
	st->streak = 0;  /* whatever the verdict, the next small message starts a new run */
	own = netaccel_peers.lookup(&st->key);
	if (!own || own->cookie != st->cookie)
		return;
	seen = own->in_msgs;
	if (seen != st->peer_seen)  /* the peer spoke: request/response, not a stream */
		return;
	now = bpf_ktime_get_ns();
	if (now - st->streak_start > cfg->demote_window_ns)  /* a trickle: latency matters */
		return;
	demote_self(st, own, cnt);
}

/* DEMOTION, while user space has not removed us yet: report when our own redirect queue (the
 * peer's bytes to us) is seen empty, and queue the candidate again if the queue was full. */
static __always_inline void demote_progress(struct conn_state *st, struct bypass_counters *cnt)
{
	struct peer_sock *own;
	__u64 ts, ud, queued = 0;
	int rerr = 0;

	own = netaccel_peers.lookup(&st->key);
	if (!own || own->cookie != st->cookie)
		return;
	ts = bpf_ktime_get_ns();  /* before the read: a report never claims a later moment */
	ud = kread_u64(st->sk + NA_OFF_SK_USER_DATA, &rerr);
	if (ud & NA_SK_USER_DATA_PSOCK)
		queued = kread_u32((ud & NA_SK_USER_DATA_PTRMASK) + NA_OFF_PSOCK_MSG_TOT_LEN, &rerr);
	if (!rerr && queued == 0)
		own->drained_ts = ts;
	if (!st->cand_queued)  /* the queue was full last time */
		queue_candidate(st);
}

static __always_inline int own_zerocopy(struct conn_state *st);  /* rule 12, at the end */

int NA_PROG_MSG(struct sk_msg_md *msg)
{
	struct sock_key peer = {};
	struct bypass_counters *cnt;
	struct bypass_config *cfg;
	struct conn_state *st;
	struct peer_sock *pv;
	struct bpf_sock *sk;
	__u64 peer_sk, ud, limit, alloc, psock;
	__u32 zero = 0;
	__u32 size, queued = 0, rcvbuf;
	int rerr = 0;
	long verdict;

	cnt = netaccel_cnt.lookup(&zero);
	if (!cnt)
		return SK_PASS;
	sk = msg->sk;
	if (!sk) {
		cnt->no_state++;
		return SK_PASS;
	}
	st = netaccel_state.sk_storage_get(sk, 0, 0);
	if (!st) {
		cnt->no_state++;
		return SK_PASS;
	}

	/* The peer's key, decided at insert (PAIRING). */
	__builtin_memcpy(&peer, &st->peer, sizeof(peer));
	size = CTX_U32(msg, size);

	cfg = netaccel_cfg.lookup(&zero);
	pv = netaccel_peers.lookup(&peer);
	if (pv) {
		/* Rule 9: the peer splices with our bytes stranded in its queue; bytes sent
		 * now, on either path, would overtake them.  Refuse; user space resets. */
		if (pv->doomed) {
			cnt->doomed_drops++;
			return SK_DROP;
		}
		/* DEMOTION: the direction's statistics; in_msgs also tells the peer's sk_msg
		 * that we sent (its run of one-way messages ends). */
		pv->in_msgs++;
		pv->in_bytes += size;
		if (cfg && size < cfg->demote_small_bytes)
			pv->in_small++;
	}
	if (st->fell_back) {  /* ordering rule 3: once on the kernel path, stay */
		if (pv && pv->pending)  /* rule 9: our last redirect is queued by now */
			__sync_lock_test_and_set(&pv->pending, 0);
		if (st->demoting)  /* leaving the sockhash: report our queue's progress */
			demote_progress(st, cnt);
		cnt->fallback_msgs++;
		return SK_PASS;
	}
	/* After shutdown(SHUT_WR) or close the sender is past ESTABLISHED/CLOSE_WAIT: TCP
	 * refuses its data with EPIPE, and a redirect would deliver it after the peer's end of
	 * file.  Take the order-safe switch and let TCP answer. */
	if (sk->state != BPF_TCP_ESTABLISHED && sk->state != BPF_TCP_CLOSE_WAIT)
		return fall_back(st, cnt, pv, FB_MISS);
	if (!cfg || !pv)  /* the peer is not (or no longer) bypassed: a miss */
		return fall_back(st, cnt, pv, FB_MISS);
	/* Rule 12: we set SO_ZEROCOPY (a plain load of the peer's entry; our own entry only
	 * while peer_psock is unknown, i.e. once per connection). */
	if (pv->sender_zerocopy || (!st->peer_psock && own_zerocopy(st)))
		return fall_back_and_leave(st, cfg, cnt, pv, FB_ZEROCOPY);

	/* Flow control rule 6: the receiver's unread redirected bytes.  The peer's psock is
	 * found once and kept (PER-MESSAGE COST). */
	peer_sk = pv->sk;
	psock = st->peer_psock;
	if (!psock) {
		ud = kread_u64(peer_sk + NA_OFF_SK_USER_DATA, &rerr);
		if (ud & NA_SK_USER_DATA_PSOCK)
			psock = st->peer_psock = ud & NA_SK_USER_DATA_PTRMASK;
	}
	/* Read only when the credit from the last read is used up: queued was read as q,
	 * we have redirected s bytes since, and only we add to it, so queued <= q + s, and
	 * credit = limit - q - s keeps queued + size <= limit exactly as a read would.  A
	 * request/response connection reads once per `limit` bytes, not once a message. */
	if ((__u64)size > st->credit) {
		if (psock)
			queued = kread_u32(psock + NA_OFF_PSOCK_MSG_TOT_LEN, &rerr);
		rcvbuf = kread_u32(peer_sk + NA_OFF_SK_RCVBUF, &rerr);
		if (rerr)  /* the peer's memory is gone: it closed */
			return fall_back(st, cnt, pv, FB_MISS);
		limit = cfg->rcv_floor_bytes;
		if ((__s32)rcvbuf > 0 && rcvbuf > limit)
			limit = rcvbuf;
		if ((__u64)queued + size > limit)
			return fall_back_and_leave(st, cfg, cnt, pv, FB_RCV_LAG);
		st->credit = limit - queued;
	}
	st->credit -= size;
	/* Flow control rule 7: node-wide TCP memory, well below pressure.  Read again after
	 * every NODE_MEM_RECHECK_BYTES redirected by this socket: the guard may be passed by
	 * that much per sending socket (the margin below pressure is half of tcp_mem[0]). */
	if ((__u64)size > st->mem_credit) {
		alloc = kread_u64(st->mem_addr, &rerr);
		if (rerr || ((__s64)alloc > 0 && alloc > cfg->node_mem_limit_pages))
			return fall_back_and_leave(st, cfg, cnt, pv, FB_NODE_MEM);
		st->mem_credit = NODE_MEM_RECHECK_BYTES;
	}
	/* (a message may be larger than the recheck interval: then the next one reads again) */
	st->mem_credit = st->mem_credit > size ? st->mem_credit - size : 0;

	/* DEMOTION: watch this direction's run of small one-way messages; once it qualifies,
	 * close the way into this socket and ask user space to remove it. */
	if (st->demoting)
		demote_progress(st, cnt);
	else if (cfg->demote_msgs)
		demote_watch(st, cfg, cnt, size);

	/* Rule 9, the sender's half: announce the redirect, then look for a reader that
	 * splices, or a receiver that is leaving (DEMOTION).  The exchange is a full barrier:
	 * it orders the write before the two plain reads.  One exchange a message: `pending`
	 * stays 1 while we keep redirecting (PER-MESSAGE COST). */
	/* The coarse clock (CLOCK_MONOTONIC as of the last tick, no clock read): `pending_ts`
	 * only has to tell a redirect in flight from one a second old (SPLICE_PENDING_GRACE_NS);
	 * its readers compare with the precise clock, which can only make it look a tick older. */
	pv->pending_ts = bpf_ktime_get_coarse_ns();
	__sync_lock_test_and_set(&pv->pending, 1);
	if (*(volatile __u64 *)&pv->splice_block)
		return fall_back(st, cnt, pv, FB_SPLICE);
	if (*(volatile __u64 *)&pv->demoted)  /* rule 11, d: and we leave the sockhash too */
		return fall_back_and_leave(st, cfg, cnt, pv, FB_DEMOTE);
	verdict = netaccel_socks.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
	if (verdict == SK_PASS) {
		cnt->redirected_msgs++;
		cnt->redirected_bytes += size;
		cnt->pair_redirected_bytes[pv->kind & (PAIR_KINDS - 1)] += size;
		return SK_PASS;
	}
	/* Miss: the peer is not (or no longer) in the sockhash. */
	return fall_back(st, cnt, pv, FB_MISS);
}

/* The bypass entry of the current task's file descriptor `fd`, or NULL when it is not a
 * socket of ours; `key` gets the socket's own 4-tuple, `recv` its sockhash key (PAIRING: an
 * aliased socket's is its peer's tuple reversed), `skp` its struct sock address. */
static __always_inline struct peer_sock *entry_of_fd(__u64 fd, struct sock_key *key,
						     struct sock_key *recv, __u64 *skp)
{
	struct sock_key *alias;
	struct peer_sock *pv;
	__u64 task, files, fdt, fdarr, file, sock, sk;
	__u32 max_fds;
	__u16 family;
	int rerr = 0;

	task = bpf_get_current_task();
	files = kread_u64(task + NA_OFF_TASK_FILES, &rerr);
	fdt = kread_u64(files + NA_OFF_FILES_FDT, &rerr);
	max_fds = kread_u32(fdt + NA_OFF_FDT_MAX_FDS, &rerr);
	if (rerr || fd >= max_fds)
		return NULL;
	fdarr = kread_u64(fdt + NA_OFF_FDT_FD, &rerr);
	file = kread_u64(fdarr + fd * 8, &rerr);
	sock = file ? kread_u64(file + NA_OFF_FILE_PRIVATE_DATA, &rerr) : 0;
	/* A socket's file points at its struct socket, which points back at the file; for any
	 * other file private_data is something else and the back pointer will not match. */
	if (rerr || !sock || kread_u64(sock + NA_OFF_SOCKET_FILE, &rerr) != file)
		return NULL;
	sk = kread_u64(sock + NA_OFF_SOCKET_SK, &rerr);
	family = kread_u16(sk + NA_OFF_SKC_FAMILY, &rerr);
	if (rerr)
		return NULL;
	if (family == NA_AF_INET) {
		fill_v4(key, kread_u32(sk + NA_OFF_SKC_RCV_SADDR, &rerr),
			kread_u32(sk + NA_OFF_SKC_DADDR, &rerr));
	} else if (family == NA_AF_INET6) {
		if (bpf_probe_read_kernel(key->local, 16, (void *)(sk + NA_OFF_SKC_V6_RCV_SADDR)) ||
		    bpf_probe_read_kernel(key->remote, 16, (void *)(sk + NA_OFF_SKC_V6_DADDR)))
			return NULL;
	} else {
		return NULL;
	}
	key->lport = kread_u16(sk + NA_OFF_SKC_NUM, &rerr);                     /* host order */
	key->rport = __builtin_bswap16(kread_u16(sk + NA_OFF_SKC_DPORT, &rerr));  /* was network */
	if (rerr)
		return NULL;
	__builtin_memcpy(recv, key, sizeof(*recv));
	pv = netaccel_peers.lookup(key);
	if (!pv || pv->sk != sk) {  /* PAIRING: an accepted socket keyed by its peer's tuple */
		alias = netaccel_alias.lookup(key);
		if (!alias)
			return NULL;
		__builtin_memcpy(recv, alias, sizeof(*recv));
		pv = netaccel_peers.lookup(alias);
	}
	if (!pv || pv->sk != sk)
		return NULL;
	*skp = sk;
	return pv;
}

/* Rules 8-10: a read of file descriptor `fd` of the current task that cannot be served from
 * the redirect queue: splice/sendfile (want 0: it sees none of the queue), or recv with
 * MSG_WAITALL of `want` bytes (tcp_bpf returns what is queued instead of waiting for all:
 * only a queue of at least `want` bytes serves it). */
static __always_inline int guard_read(__u64 fd, __u64 want)
{
	struct no_bypass_key learn = {};
	struct splice_event ev = {};
	struct sock_key key = {}, recv = {};
	struct bypass_counters *cnt;
	struct peer_sock *pv;
	__u64 sk = 0, ud;
	__u32 zero = 0, queued = 0, learned = NB_LEARNED;
	__u64 pending;
	int rerr = 0;

	pv = entry_of_fd(fd, &key, &recv, &sk);
	cnt = netaccel_cnt.lookup(&zero);
	if (!pv || !cnt)
		return 0;  /* not a socket of ours */

	cnt->splice_seen++;
	__builtin_memcpy(learn.addr, key.local, 16);
	learn.port = pv->passive ? key.lport : 0;
	netaccel_nobypass.insert(&learn, &learned);  /* rule 10 */
	if (pv->doomed)
		return 0;
	/* Rule 9, the reader's half: raise the flag, then look (the exchange orders them). */
	__sync_lock_test_and_set(&pv->splice_block, 1);
	pending = __sync_fetch_and_add(&pv->pending, 0);
	/* pending_ts is coarse (a tick behind at most); tracing programs have no coarse clock */
	if (pending && bpf_ktime_get_ns() - pv->pending_ts > SPLICE_PENDING_GRACE_NS)
		pending = 0;  /* the sender's last redirect, long queued */
	ud = kread_u64(sk + NA_OFF_SK_USER_DATA, &rerr);
	if (ud & NA_SK_USER_DATA_PSOCK)
		queued = kread_u32((ud & NA_SK_USER_DATA_PTRMASK) + NA_OFF_PSOCK_MSG_TOT_LEN, &rerr);
	if (!rerr && ((want && queued >= want) || (!pending && !queued))) {
		cnt->splice_safe++;  /* served in full; the sender's new data takes TCP */
		return 0;
	}
	if (want) {
		/* MSG_WAITALL: this read returns what is queued (tcp_bpf does not wait for all,
		 * and a tracepoint cannot make it); every later read is served by TCP in full.
		 * Nothing is lost or reordered: no reset. */
		cnt->waitall_short++;
		return 0;
	}
	pv->doomed = 1;
	cnt->splice_doomed++;
	__builtin_memcpy(ev.local, key.local, 16);
	__builtin_memcpy(ev.remote, key.remote, 16);
	ev.lport = key.lport;
	ev.rport = key.rport;
	ev.tgid = bpf_get_current_pid_tgid() >> 32;
	ev.tid = (__u32)bpf_get_current_pid_tgid();
	/* The socket's own netns: a thread may read a socket of another namespace. */
	ev.netns_ino = kread_u32(kread_u64(sk + NA_OFF_SKC_NET, &rerr) + NA_OFF_NET_NS_INUM, &rerr);
	ev.queued = queued;
	ev.pending = pending;
	ev.passive = pv->passive;
	ev.cookie = pv->cookie;
	netaccel_events.push(&ev, BPF_EXIST);  /* full: drop the oldest */
	return 0;
}

/* The syscall tracepoints' records: the arguments are 8-byte fields from offset 16
 * (/sys/kernel/tracing/events/syscalls/<name>/format). */
#define SYSCALL_ARG(ctx, n) (*(__u64 *)((char *)(ctx) + 16 + 8 * (n)))
#define NA_MSG_WAITALL 0x100
#define NA_MAX_IOV 8  /* iovecs summed for recvmsg; more count as "any size" */

/* syscalls:sys_enter_splice(fd_in, off_in, fd_out, ...) */
int NA_PROG_SPLICE(void *ctx)
{
	return guard_read(SYSCALL_ARG(ctx, 0), 0);
}

/* syscalls:sys_enter_sendfile64(out_fd, in_fd, ...) */
int NA_PROG_SENDFILE(void *ctx)
{
	return guard_read(SYSCALL_ARG(ctx, 1), 0);
}

/* syscalls:sys_enter_recvfrom(fd, ubuf, size, flags, ...): runs for every recvfrom of the
 * node, so the flag test comes first. */
int NA_PROG_RECVFROM(void *ctx)
{
	if (!(SYSCALL_ARG(ctx, 3) & NA_MSG_WAITALL))
		return 0;
	return guard_read(SYSCALL_ARG(ctx, 0), SYSCALL_ARG(ctx, 2) ?: 1);
}

/* syscalls:sys_enter_recvmsg(fd, msg, flags): the wanted size is the sum of the iovecs of
 * the user's struct msghdr (msg_iov at 16, msg_iovlen at 24 on 64-bit; user ABI). */
int NA_PROG_RECVMSG(void *ctx)
{
	__u64 msg, iov, n, want = 0, len;
	int i;

	if (!(SYSCALL_ARG(ctx, 2) & NA_MSG_WAITALL))
		return 0;
	msg = SYSCALL_ARG(ctx, 1);
	if (bpf_probe_read_user(&iov, 8, (void *)(msg + 16)) ||
	    bpf_probe_read_user(&n, 8, (void *)(msg + 24)))
		return 0;
	if (n > NA_MAX_IOV)
		return guard_read(SYSCALL_ARG(ctx, 0), ~0ULL);
	for (i = 0; i < NA_MAX_IOV; i++) {
		if (i >= n || bpf_probe_read_user(&len, 8, (void *)(iov + 16 * i + 8)))
			break;
		want += len;
	}
	return guard_read(SYSCALL_ARG(ctx, 0), want ?: 1);
}

/* ---- io_uring splice (rule 8b) and SO_ZEROCOPY (rule 12) --------------------------------
 *
 * 8b. IORING_OP_SPLICE reads a socket through the same tcp_splice_read() as splice(2) but
 *     passes no syscall tracepoint.  io_uring:io_uring_submit_req fires in io_submit_sqe()
 *     right after io_init_req(), which ran the opcode's prep (io_splice_prep has filled
 *     `struct io_splice`, the command area at the start of the io_kiocb, with splice_fd_in
 *     and flags), and before the request is issued (the read itself comes later, in this
 *     task or an io-wq worker).  It fires in the submitting task, whose fd
 *     table is the one io_uring resolves splice_fd_in in; with IORING_SETUP_SQPOLL it fires
 *     in the ring's SQ thread, which shares its creator's fd table (CLONE_FILES), again the
 *     table io_uring uses.  So guard_read(splice_fd_in, 0) sees the socket the splice will
 *     read, before it reads, exactly as for splice(2) (tests/kernel/test_bypass_splice.py,
 *     io_uring-splice and io_uring-splice-sqpoll).  The opcode number, the io_kiocb/io_splice
 *     offsets and the tracepoint's field offsets come from the running kernel (BTF, tracefs).
 *     A registered input file (SPLICE_F_FD_IN_FIXED: an index into the ring's own file
 *     table, not an fd) is not resolved: counted (uring_splice_fixed, every such splice on
 *     the node, sockets of ours or not), not guarded.  IORING_OP_RECV/RECVMSG need nothing:
 *     they read through tcp_bpf_recvmsg like recv(2), and with MSG_WAITALL io_uring itself
 *     retries a short read of a stream socket until it is full
 *     (tests/kernel/test_bypass_api.py, test_io_uring_recv_waitall).
 *
 * 12. ZEROCOPY.  A bypassed sender's MSG_ZEROCOPY send is copied into an sk_msg by
 *     tcp_bpf_sendmsg and redirected: no completion ever reaches its error queue, and an
 *     application that waits for completions before reusing its buffers stalls.  The same
 *     send taking SK_PASS (socket still in the sockhash) is pushed to TCP by tcp_bpf one
 *     scatterlist element (a page fragment, <= 32 KiB) at a time, each completed with its
 *     own id: every completion arrives (code SO_EE_CODE_ZEROCOPY_COPIED, as the kernel
 *     path's on this node), but a send spanning k fragments takes k ids.  Once the socket
 *     left the sockhash, every send is one id again, as on the kernel path (measured:
 *     tests/kernel/test_bypass_api.py, test_msg_zerocopy).  So:
 *     - syscalls:sys_enter_setsockopt (level and name tested first: it runs for every
 *       setsockopt of the node) with SOL_SOCKET, SO_ZEROCOPY and a value != 0 resolves the
 *       fd as guard_read does and marks the socket's own netaccel_peers entry (`zerocopy`)
 *       and its peer's (`sender_zerocopy`), before the kernel sets SOCK_ZEROCOPY under the
 *       socket lock.  A send is zerocopy only if it sees SOCK_ZEROCOPY, under the same lock,
 *       so it sees the marks too.
 *     - The sender's sk_msg then takes the order-safe switch (rule 3, reason zerocopy,
 *       counted fallback_dirs_zerocopy) and asks to leave the sockhash like a flow-control
 *       fallback (rules 6-7: DEMOTION's steps, not under the policy "always").  Leaving
 *       moves the peer's direction to TCP too (DEMOTION, step a: nothing can be redirected
 *       into a socket outside the sockhash); under "always" it stays bypassed.
 *     PER-MESSAGE COST: one plain load, pv->sender_zerocopy, from the peer entry the verdict
 *     has just looked up and written (in_msgs).  The peer's entry may not exist yet when the
 *     option is set (a client right after connect(), the server's PASSIVE_ESTABLISHED still
 *     in a backlog); then only the sender's own entry carries the mark, and the verdict reads
 *     it while peer_psock is unknown: one hash lookup, on the connection's first verdict.
 *     A sender already on TCP for another reason (rule 3) stays as it is: its completions
 *     arrive, per fragment.
 *     Not learned into netaccel_nobypass: the switch is immediate and nothing is lost or
 *     stalls; what remains (several ids for one large send) lasts only until the socket
 *     leaves the sockhash (for the connection's life under the policy "always"); and
 *     learning would take the sender's workload (a client: its whole address) off the
 *     bypass in both directions for every later connection.
 */
#if !defined(NA_IORING_OP_SPLICE) || !defined(NA_TP_URING_REQ) || \
    !defined(NA_TP_URING_OPCODE) || !defined(NA_OFF_KIOCB_CMD) || \
    !defined(NA_OFF_SPLICE_FD_IN) || !defined(NA_OFF_SPLICE_FLAGS)
#error "the loader passes the io_uring guard's layout read from BTF and tracefs"
#endif
#define NA_SPLICE_F_FD_IN_FIXED 0x80000000U  /* include/uapi/linux/io_uring.h */
#define NA_SOL_SOCKET 1
#define NA_SO_ZEROCOPY 60

/* io_uring:io_uring_submit_req(ctx, req, user_data, opcode, flags, sq_thread, op_str) */
int NA_PROG_URING(void *ctx)
{
	struct bypass_counters *cnt;
	__u64 cmd;
	__u32 zero = 0, flags;
	int fd_in, rerr = 0;

	if (*(__u8 *)((char *)ctx + NA_TP_URING_OPCODE) != NA_IORING_OP_SPLICE)
		return 0;
	cmd = *(__u64 *)((char *)ctx + NA_TP_URING_REQ) + NA_OFF_KIOCB_CMD;
	fd_in = (int)kread_u32(cmd + NA_OFF_SPLICE_FD_IN, &rerr);
	flags = kread_u32(cmd + NA_OFF_SPLICE_FLAGS, &rerr);
	if (rerr || fd_in < 0)
		return 0;
	if (flags & NA_SPLICE_F_FD_IN_FIXED) {
		cnt = netaccel_cnt.lookup(&zero);
		if (cnt)
			cnt->uring_splice_fixed++;
		return 0;
	}
	return guard_read(fd_in, 0);
}

/* syscalls:sys_enter_setsockopt(fd, level, optname, optval, optlen): runs for every
 * setsockopt of the node, so the level and name tests come first. */
int NA_PROG_SETSOCKOPT(void *ctx)
{
	struct sock_key key = {}, recv = {}, peer = {};
	struct peer_sock *own, *pv;
	__u64 sk = 0;
	int val = 0;

	if ((__u32)SYSCALL_ARG(ctx, 1) != NA_SOL_SOCKET ||
	    (__u32)SYSCALL_ARG(ctx, 2) != NA_SO_ZEROCOPY)
		return 0;
	if ((__s32)SYSCALL_ARG(ctx, 4) < (int)sizeof(val) ||
	    bpf_probe_read_user(&val, sizeof(val), (void *)SYSCALL_ARG(ctx, 3)) || !val)
		return 0;
	own = entry_of_fd(SYSCALL_ARG(ctx, 0), &key, &recv, &sk);
	if (!own)
		return 0;
	own->zerocopy = 1;
	/* The peer's entry: our sockhash key reversed, the key our sk_msg sends to (PAIRING). */
	reverse_key(&peer, &recv);
	pv = netaccel_peers.lookup(&peer);
	if (pv)
		pv->sender_zerocopy = 1;
	return 0;
}

/* Rule 12, the sender's own mark (declared before NA_PROG_MSG). */
static __always_inline int own_zerocopy(struct conn_state *st)
{
	struct peer_sock *own = netaccel_peers.lookup(&st->key);

	return own && own->cookie == st->cookie && own->zerocopy;
}
