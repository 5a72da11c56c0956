/* Every struct shared with user space. lb/structs.py mirrors each one with
 * ctypes; tests/test_structs.py compiles this header and checks the layouts. */
#ifndef LB_STRUCTS_H
#define LB_STRUCTS_H

#include <linux/types.h>
#include "consts.h"

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
	__u32 ring_base; /* the VIP's Maglev table, as in vip_info: a SYN-ACK with no entry finds its backend by it */
	__u32 ring_size;
	__u32 info_flags; /* vip_info.flags: a packet that finds its VIP through vip_slots reads them here */
};

/* backends array, by backend id. A flow entry is trusted only while the
 * record still carries the generation and the VIP the entry names: the control
 * plane writes a never-used generation whenever it binds the id anew. */
struct backend {
	union lb_addr addr;
	__be16 port;
	__u16 pad;
	__u32 flags;
	__u32 generation;
	__u32 vip_id;
};

/* reply_sources hash key: a backend's endpoint as it appears in its replies */
struct endpoint {
	union lb_addr addr;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

/* reply_sources value: the VIPs a backend endpoint serves; a reply belongs to
 * the flow of one of them (looked up by the client's tuple towards each) */
struct reply_source {
	__u32 count;
	__u16 vip_ids[LB_REPLY_VIPS];
};

/* Where a packet leaves: egress interface and the MACs to write. */
struct next_hop {
	__u32 ifindex; /* 0: not resolved */
	__u8 smac[6];
	__u8 dmac[6];
	__u32 epoch;   /* a cached copy is good while it equals the nh_epoch map's (see ensure_next_hop) */
};

/* egress_vlans hash value, by ifindex: an egress interface that is a VLAN device. The
 * data plane sends out of its lower device, the frame carrying the VLAN's tag (vlan.h). */
struct egress_vlan {
	__u32 lower_ifindex;
	__be16 proto; /* ETH_P_8021Q or ETH_P_8021AD */
	__be16 tci;   /* the VLAN id (priority 0) */
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

/* conn_table value: the flow's backend (valid while its generation and VIP
 * match the backend record), when it was last seen, and the cached next hop
 * towards the client. (The way to the backend is the backend's, in backend_nh:
 * without a copy of it here, an entry with the LRU's element header and the key
 * fills exactly two cache lines.) */
struct flow_entry {
	__u32 backend_id;
	__u16 vip_id;
	__u16 flags;
	__u32 generation;
	__u32 last_seen; /* ticks of the data plane's clock (lb_clock, about seconds) */
	struct next_hop reply_nh; /* towards the client */
};

/* snat_pools array, by VIP id: a full-NAT VIP's source addresses, each with
 * ports port_min .. port_min + port_count - 1 (host order) */
struct snat_pool {
	__u32 count; /* addresses in addrs, at most LB_SNAT_ADDRS */
	__u16 port_min;
	__u16 port_count;
	union lb_addr addrs[LB_SNAT_ADDRS];
};

/* fullnat_flows value, by the client's flow_key (as conn_table's): the flow
 * as conn_table holds it, and the source address and port it took */
struct fullnat_flow {
	struct flow_entry flow;
	union lb_addr snat_addr;
	__be16 snat_port;
	__u16 pad;
};

/* fullnat_ports value, by a reply's flow_key (backend -> source address and
 * port): whose the port is. Inserted only where none is (BPF_NOEXIST), so
 * two flows never share a tuple towards a backend. */
struct fullnat_owner {
	union lb_addr client;
	__be16 client_port;
	__be16 vip_port; /* the client's destination port (a VIP of every port keeps it) */
	__u32 vip_id;
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
	/* idle timeouts in ticks of 2^30 ns (0: the default of consts.h) */
	__u32 tcp_timeout;
	__u32 tcp_closing_timeout; /* after a FIN or an RST */
	__u32 udp_timeout;
	/* ticks added to the kernel's clock: tests advance the data plane's time with it */
	__u32 clock_offset;
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
