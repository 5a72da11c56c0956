/* Every struct shared with user space. lb/structs.py mirrors each one with
 * ctypes; tests/test_structs.py compiles this header and checks the layouts. */
#ifndef LB_STRUCTS_H
#define LB_STRUCTS_H

#include <linux/types.h>

/* One address type for IPv4 and IPv6: IPv4 is stored IPv4-mapped (::ffff:a.b.c.d). */
union lb_addr {
	__u8 b[16];
	__be32 w[4];
};

/* vips map key: what a client sends to */
struct vip_key {
	union lb_addr addr;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

/* vips map value. The VIP's Maglev table is maglev[ring_base .. ring_base + ring_size - 1]:
 * its size follows its backend count (lb/maglev.py ring_size_for), so a change writes
 * what the VIP needs, not LB_RING_SIZE slots. */
struct vip_info {
	__u32 id;
	__u32 flags;
	__u32 ring_base;
	__u32 ring_size; /* a prime, at most LB_RING_SIZE */
};

/* vip_meta array, by VIP id: what a reply's source is rewritten back to */
struct vip_meta {
	union lb_addr addr;
	__be16 port;
	__u8 proto;
	__u8 mode;
	__u32 flags;
};

/* backends array, by backend id */
struct backend {
	union lb_addr addr;
	__be16 port;
	__u16 pad;
	__u32 flags;
};

/* reply_sources hash key: a backend's endpoint as it appears in its replies */
struct endpoint {
	union lb_addr addr;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

/* reply_sources value: the VIP a backend endpoint serves, unless it is shared */
struct reply_source {
	__u32 vip_id;
	__u32 flags;
};

/* Where a packet leaves: egress interface and the MACs to write. */
struct next_hop {
	__u32 ifindex; /* 0: not resolved */
	__u8 smac[6];
	__u8 dmac[6];
	__u32 epoch;   /* a cached copy is good while it equals the nh_epoch map's (see ensure_next_hop) */
};

/* routes LPM trie key: prefixlen counts bits of the (IPv4-mapped) address */
struct route_key {
	__u32 prefixlen;
	union lb_addr addr;
};

/* conn_table key: a 5-tuple as seen on the wire */
struct flow_key {
	union lb_addr src;
	union lb_addr dst;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* conn_table value: the flow's backend and the cached next hops of both directions */
struct flow_entry {
	__u32 backend_id;
	__u16 vip_id;
	__u16 flags;
	struct next_hop nh;       /* towards the backend */
	struct next_hop reply_nh; /* towards the client */
};

/* per-CPU counters, per VIP and per backend */
struct lb_counters {
	__u64 packets;
	__u64 bytes;
	__u64 reply_packets;
	__u64 reply_bytes;
	__u64 new_flows;
};

/* lb_config array, one entry: switches the control plane sets */
struct lb_config {
	__u32 flags;
};

/* lb_state array, one entry, written and read by the control plane only: what the maps hold */
struct lb_state {
	__u64 revision; /* the desired state's revision the maps hold (or are being changed to: see reconcile.py) */
	__u32 layout;   /* LB_LAYOUT_VERSION of the program that created the maps */
	__u32 pad;
};

/* vip_addrs hash value, by address: how many VIPs use it, and what happens to
 * what none of them serves */
struct vip_addr {
	__u32 vips;
	__u32 flags; /* LB_ADDR_PASS_UNSERVED */
};

/* acl LPM trie key: a VIP and a source prefix; prefixlen counts the VIP id's
 * 32 bits, then the (IPv4-mapped) address's */
struct acl_key {
	__u32 prefixlen;
	__u32 vip_id;
	union lb_addr addr;
};

/* acl value */
struct acl_rule {
	__u32 action; /* LB_ACL_ALLOW or LB_ACL_DENY */
};

/* XDP metadata a probe (BPF_PROG_TEST_RUN) puts before the packet: the
 * program writes the reason of its verdict into it. */
struct probe_meta {
	__u32 magic; /* LB_PROBE_MAGIC */
	__u32 reason;
};

#endif
