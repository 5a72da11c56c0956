/* Every map of the data plane, all pinned under LB_PIN_DIR so that they
 * outlive the process that loaded them (bcc adopts a pin that exists). */
#ifndef LB_MAPS_H
#define LB_MAPS_H

#include "consts.h"
#include "structs.h"

#define PIN(name) LB_PIN_DIR "/" #name

/* (address, port, protocol) -> VIP id and flags */
BPF_TABLE_PINNED("hash", struct vip_key, struct vip_info, vips, LB_MAX_VIPS, PIN(vips));
/* address -> VIPs on it: which packets the drop policy and ICMP echo apply to */
BPF_TABLE_PINNED("hash", union lb_addr, struct vip_addr, vip_addrs, LB_MAX_VIPS, PIN(vip_addrs));
/* the control plane's switches */
BPF_TABLE_PINNED("array", __u32, struct lb_config, lb_config, 1, PIN(lb_config));
/* the control plane's own record: the state revision the maps hold, their layout version */
BPF_TABLE_PINNED("array", __u32, struct lb_state, lb_state, 1, PIN(lb_state));
/* VIP id -> the VIP itself, for rewriting replies */
BPF_TABLE_PINNED("array", __u32, struct vip_meta, vip_meta, LB_MAX_VIPS, PIN(vip_meta));
/* vip_info.ring_base + slot -> backend id: one Maglev table per VIP, in its id's room of LB_RING_SIZE slots */
BPF_TABLE_PINNED("array", __u32, __u32, maglev, LB_MAX_VIPS * LB_RING_SIZE, PIN(maglev));
/* backend id -> backend */
BPF_TABLE_PINNED("array", __u32, struct backend, backends, LB_MAX_BACKENDS, PIN(backends));
/* backend id -> its next hop, cached by the data plane, cleared by the control plane when routes change */
BPF_TABLE_PINNED("array", __u32, struct next_hop, backend_nh, LB_MAX_BACKENDS, PIN(backend_nh));
/* addr_bucket(address) -> LB_FILTER_* bits: which lookups an address can skip (consts.h) */
BPF_TABLE_PINNED("array", __u32, __u32, addr_filter, LB_ADDR_FILTER_SIZE, PIN(addr_filter));
/* vip_slot(address, port, protocol) -> VIP id + 1, or 0 (consts.h) */
BPF_TABLE_PINNED("array", __u32, __u32, vip_slots, LB_VIP_SLOTS, PIN(vip_slots));
/* backend (address, port, protocol) -> the VIP its replies are rewritten to */
BPF_TABLE_PINNED("hash", struct endpoint, struct reply_source, reply_sources, LB_MAX_BACKENDS, PIN(reply_sources));
/* 5-tuple -> backend: by the client's tuple; also by the backend's reply tuple for shared backends */
BPF_TABLE_PINNED("lru_hash", struct flow_key, struct flow_entry, conn_table, LB_CONN_TABLE_SIZE, PIN(conn_table));
/* Full NAT (fullnat.h): VIP id -> its source addresses and ports; the client's
 * tuple -> its flow and source port; a reply's tuple -> the client that owns the port */
BPF_TABLE_PINNED("array", __u32, struct snat_pool, snat_pools, LB_MAX_VIPS, PIN(snat_pools));
BPF_TABLE_PINNED("lru_hash", struct flow_key, struct fullnat_flow, fullnat_flows, LB_FULLNAT_TABLE_SIZE,
		 PIN(fullnat_flows));
BPF_TABLE_PINNED("hash", struct flow_key, struct fullnat_owner, fullnat_ports, LB_FULLNAT_TABLE_SIZE,
		 PIN(fullnat_ports));
/* Per-CPU room for what full NAT's new flows and replies build (the program's 512 bytes of
 * stack are spent by the paths it shares with NAT); scratch, not pinned, not shared. */
/* Where a full-NAT ICMP error goes, and what its quote becomes (fullnat.h fullnat_icmp_rewrite). */
struct fullnat_icmp {
	union lb_addr outer_src, outer_dst;
	union lb_addr quote_src, quote_dst;
	__be16 quote_sport, quote_dport;
	union lb_addr from_src, from_dst; /* the outer addresses it arrived with */
	__be32 old_words[8], new_words[8]; /* the quote's addresses, before and after, for the checksum */
};

struct fullnat_scratch {
	struct fullnat_flow flow; /* a new flow's entry */
	struct fullnat_owner owner;
	struct flow_key rkey;     /* a source port's reverse tuple */
	struct flow_key key;      /* a client's tuple */
	struct fullnat_icmp icmp; /* an ICMP error's translation */
};
BPF_PERCPU_ARRAY(fullnat_scratch, struct fullnat_scratch, 1);
/* (VIP, source prefix) -> allow or deny */
BPF_TABLE_PINNED("lpm_trie", struct acl_key, struct acl_rule, acl, LB_MAX_ACL_RULES, PIN(acl), BPF_F_NO_PREALLOC);
/* destination prefix -> next hop, mirrored from the kernel's routes and neighbours */
BPF_TABLE_PINNED("lpm_trie", struct route_key, struct next_hop, routes, LB_MAX_ROUTES, PIN(routes), BPF_F_NO_PREALLOC);
/* one counter the control plane bumps when the kernel's routes or neighbours change: cached next hops
 * (a backend's, a flow's) of an older epoch are resolved again */
BPF_TABLE_PINNED("array", __u32, __u32, nh_epoch, 1, PIN(nh_epoch));
/* ifindex of a VLAN device -> its lower device and tag, mirrored from the kernel's links */
BPF_TABLE_PINNED("hash", __u32, struct egress_vlan, egress_vlans, LB_MAX_VLANS, PIN(egress_vlans));
/* ifindex -> ifindex, for each interface the LB sends out of with XDP_REDIRECT */
BPF_XDP_REDIRECT_MAP("devmap:" PIN(tx_ports), int, tx_ports, LB_MAX_IFINDEX);
/* per-CPU counters */
BPF_TABLE_PINNED("percpu_array", __u32, struct lb_counters, vip_stats, LB_MAX_VIPS, PIN(vip_stats));
BPF_TABLE_PINNED("percpu_array", __u32, struct lb_counters, backend_stats, LB_MAX_BACKENDS, PIN(backend_stats));
BPF_TABLE_PINNED("percpu_array", __u32, __u64, reason_stats, LB_REASON_MAX, PIN(reason_stats));

#endif
