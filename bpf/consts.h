/* Every limit, flag and reason code of the data plane, in one place. */
#ifndef LB_CONSTS_H
#define LB_CONSTS_H

/* Sizes are set by the loader at compile time (-D...); these are the defaults. */
#ifndef LB_RING_SIZE
#define LB_RING_SIZE 65537 /* the largest Maglev table of a VIP (slots, a prime): each VIP has this much room */
#endif
#ifndef LB_MAX_VIPS
#define LB_MAX_VIPS 256
#endif
#ifndef LB_MAX_BACKENDS
#define LB_MAX_BACKENDS 4096
#endif
#ifndef LB_CONN_TABLE_SIZE
#define LB_CONN_TABLE_SIZE 1048576
#endif
#ifndef LB_MAX_ACL_RULES
#define LB_MAX_ACL_RULES 16384
#endif
#ifndef LB_MAX_ROUTES
#define LB_MAX_ROUTES 16384
#endif
/* The DEVMAP is indexed by ifindex itself (no lookup on the way out): an
 * interface with a larger ifindex cannot be attached. */
#define LB_MAX_IFINDEX 65536
#ifndef LB_MAX_VLANS
#define LB_MAX_VLANS 4096
#endif
#ifndef LB_PIN_DIR
#define LB_PIN_DIR "/sys/fs/bpf/lb/default"
#endif

/* The address filter (addr_filter map): one word per bucket of addresses (hash.h
 * addr_bucket). A set bit says no address of that kind falls in the bucket, so a
 * packet to or from it needs no hash lookup for it; 0 (a new map, or a bucket in
 * use) says nothing: the maps are asked. The control plane keeps it (lb/addrfilter.py). */
#define LB_ADDR_FILTER_SIZE 4096 /* a power of two */
#define LB_ADDR_FILTER_BITS 12
#define LB_FILTER_NO_VIP (1U << 0)     /* no VIP's address */
#define LB_FILTER_NO_BACKEND (1U << 1) /* no NAT backend endpoint's address (no replies to rewrite) */

/* vip_slots: a direct-mapped index of the VIPs of one port (hash.h vip_slot), so
 * that most packets to a VIP find it without a hash lookup: a slot holds the VIP's
 * id + 1 when exactly one such VIP falls in it, 0 otherwise (then the vips map is
 * asked). A slot's VIP counts only if its vip_meta names the packet's address,
 * port and protocol, so a stale slot is slower, never wrong. */
#define LB_VIP_SLOTS 4096 /* a power of two */
#define LB_VIP_SLOT_BITS 12

/* How many VIPs one backend endpoint (address, port, protocol) may serve in NAT mode */
#define LB_REPLY_VIPS 6

/* Full NAT: a VIP's pool of source addresses (each with its range of ports),
 * and how many (address, port) slots a new flow tries from its hash before it
 * is dropped as exhausted (fullnat.h). */
#define LB_SNAT_ADDRS 8
#define LB_SNAT_PROBES 8
#ifndef LB_FULLNAT_TABLE_SIZE
#define LB_FULLNAT_TABLE_SIZE 65536
#endif

/* The connection table's clock ticks every 2^30 ns (1.07 s). */
#define LB_TICK_SHIFT 30
/* Idle timeouts (ticks) when lb_config leaves them 0: an established TCP
 * flow as IPVS has it (15 min; keepalives are usually shorter), a closing one
 * (FIN or RST seen) long enough for the last ACKs (10 s), UDP as conntrack has
 * it (30 s). The control plane writes lb_config's from seconds, rounded up. */
#define LB_TCP_TIMEOUT 839
#define LB_TCP_CLOSING_TIMEOUT 10
#define LB_UDP_TIMEOUT 28

/* Backend id 0 never names a backend: an empty Maglev slot holds it. */
#define LB_NO_BACKEND 0

/* vip_meta.flags */
#define LB_VIP_ACTIVE (1U << 0)
#define LB_VIP_META_HASH_SOURCE (1U << 1) /* as LB_VIP_HASH_SOURCE: a SYN-ACK without an entry asks Maglev the same way */

/* vip_info.flags */
#define LB_VIP_HASH_SOURCE (1U << 0) /* pick the backend by the client's address alone (session affinity) */
#define LB_VIP_ACL (1U << 1)         /* the VIP has source rules: look them up */
#define LB_VIP_ACL_ALLOWLIST (1U << 2) /* it has allow rules: a source no rule matches is denied */
#define LB_VIP_DSR (1U << 3)         /* forwarding mode dsr: only the MACs change */
#define LB_VIP_TUNNEL (1U << 4)      /* forwarding mode tunnel: IPIP / IPv6-in-IPv6 to the backend */
#define LB_VIP_FULLNAT (1U << 5)     /* forwarding mode fullnat: source and destination rewritten (fullnat.h) */

/* vip_addr.flags */
#define LB_ADDR_PASS_UNSERVED (1U << 0) /* what no VIP of the address serves goes to the host, not dropped */

/* acl_rule.action */
#define LB_ACL_ALLOW 1
#define LB_ACL_DENY 2

/* lb_config.flags */
#define LB_CFG_ANY_PORT (1U << 0) /* some VIP takes every port: look up port 0 too */
#define LB_CFG_FULLNAT (1U << 1)  /* some VIP is full NAT: a packet of no VIP may be a reply to a source address */

/* An ICMP echo reply leaves with this TTL. */
#define LB_ICMP_TTL 64

/* flow_entry.flags */
#define LB_FLOW_CLOSING (1U << 0) /* a FIN or an RST was seen: the short timeout applies */
#define LB_FLOW_LOCAL (1U << 1) /* a connection of the LB host itself, steered at TC egress */

/* skb->mark of a locally generated packet the TC egress program steers to
 * one backend (health checks): LB_MARK_MAGIC | backend id. */
#define LB_MARK_MAGIC 0x4c000000U
#define LB_MARK_MAGIC_MASK 0xff000000U
#define LB_MARK_BACKEND_MASK 0x00ffffffU

/* backend.flags */
#define LB_BACKEND_IN_USE (1U << 0)
#define LB_BACKEND_NO_NEW (1U << 1) /* removed, drained or down: a SYN naming it picks again */
#define LB_BACKEND_SHARED (1U << 2) /* NAT endpoint of several VIPs: its SYN-ACKs need the SYN's entry */

/* probe_meta.magic: "lbpr" */
/* Layout version of the pinned maps: bump it whenever the meaning of a map's key or
 * value changes (sizes are checked on their own). A data plane whose maps carry
 * another version is migrated by lbctl daemon (control/adopt.py), never reinterpreted.
 * 1: before lb_state recorded it. 3: vip_meta.info_flags (vip_slots). 4: full NAT (vip_info flag,
 * lb_config flag, its maps). */
#define LB_LAYOUT_VERSION 4

#define LB_PROBE_MAGIC 0x6c627072U

/* Forwarding modes (vip_meta.mode; the data plane reads them from vip_info.flags) */
#define LB_MODE_NAT 0
#define LB_MODE_DSR 1
#define LB_MODE_TUNNEL 2
#define LB_MODE_FULLNAT 3

/* Tunnel mode's outer header: hop limit, and the prefixes of its source
 * address, whose low bits come from the client (see tunnel.h). */
#define LB_ENCAP_TTL 64
#define LB_ENCAP_SRC4_PREFIX 0xac100000U /* 172.16.0.0/16 */
#define LB_ENCAP_SRC6_PREFIX 0xfd006c62U /* fd00:6c62::/96 */

/* Why the program did what it did: one per-CPU counter each, in reason_stats at
 * its value. Values are explicit and append-only (pinned counters keep their
 * meaning across upgrades): a new reason takes the next value and moves
 * LB_REASON_MAX; none is renumbered or reused. Mirrored in lb/structs.py
 * (REASONS, index = value) and checked by a test. */
enum lb_reason {
	LB_FWD_NAT = 0,               /* client -> VIP, rewritten to a backend */
	LB_FWD_REPLY = 1,             /* backend -> client, rewritten back to the VIP */
	LB_TX_ICMP_ECHO = 2,          /* ICMP echo request to a VIP, answered here */
	LB_PASS_NOT_IP = 3,           /* neither IPv4 nor IPv6: ARP, LLDP, ... */
	LB_PASS_NOT_VIP = 4,          /* IP but not for a VIP nor a reply from a backend */
	LB_PASS_IP_OPTIONS = 5,       /* IPv4 options or IPv6 extension headers, not to a VIP */
	LB_PASS_FRAGMENT = 6,         /* IPv4 or IPv6 fragment, not to a VIP */
	LB_PASS_UNSUPPORTED_L4 = 7,   /* not TCP, UDP or ICMP, not to a VIP */
	LB_PASS_NEIGH_UNRESOLVED = 8, /* rewritten, handed to the kernel to resolve the next hop's MAC */
	LB_PASS_EGRESS_UNMANAGED = 9, /* rewritten, its egress interface not the LB's: left to the kernel to forward (XDP) */
	LB_PASS_MALFORMED = 10,       /* truncated or inconsistent headers, not to a VIP */
	LB_DROP_NO_BACKEND = 11,      /* VIP has no backend to send to */
	LB_DROP_NO_ROUTE = 12,        /* no route to the chosen backend or the client */
	LB_DROP_IP_OPTIONS = 13,      /* to a VIP: IPv4 options and IPv6 extension headers are not balanced */
	LB_DROP_FRAGMENT = 14,        /* to a VIP: fragments are not balanced */
	LB_DROP_UNSUPPORTED_L4 = 15,  /* to a VIP: not TCP or UDP (nor ICMP echo or too-big) */
	LB_DROP_MALFORMED = 16,       /* to a VIP: truncated or inconsistent headers */
	LB_DROP_ACL = 17,             /* to a VIP: the source is not allowed */
	LB_FWD_DSR = 18,              /* client -> VIP, sent on to a backend's MAC (direct server return) */
	LB_FWD_TUNNEL = 19,           /* client -> VIP, encapsulated to a backend (IPIP or IPv6-in-IPv6) */
	LB_DROP_NO_HEADROOM = 20,     /* tunnel mode: no room in front of the packet for the outer header */
	LB_FWD_ICMP_ERROR = 21,       /* fragmentation needed / packet too big about a flow, sent to its backend */
	LB_DROP_ICMP_NO_FLOW = 22,    /* fragmentation needed / packet too big to a VIP, about no known flow */
	LB_FWD_STEERED = 23,          /* the LB host's own packet to a VIP, marked for a backend: sent to it (TC egress) */
	LB_PASS_LOCAL_REPLY = 24,     /* a backend's reply to a steered connection, rewritten back to the VIP, for the host */
	LB_DROP_NEIGH_UNRESOLVED = 25, /* dsr: the backend's MAC is unknown, and the kernel cannot forward a packet to a VIP */
	LB_DROP_UNSERVED = 26,    /* to a VIP's address, on a port or protocol no VIP of it serves */
	LB_PASS_UNSERVED = 27,    /* the same, to an address whose unserved traffic the operator passes to the host */
	LB_PASS_V4_MAPPED = 28,   /* IPv6 with an IPv4-mapped address (::ffff:a.b.c.d, never valid on the wire), not to a VIP */
	LB_DROP_V4_MAPPED = 29,   /* the same, to a VIP's address (it must not reach an IPv4 VIP) or quoting one */
	LB_FWD_EGRESS_UNMANAGED = 30, /* dsr, egress interface not the LB's: sent out of it with bpf_redirect (XDP) */
	LB_DROP_REPLY_NO_FLOW = 31,   /* from a NAT backend's endpoint, to be forwarded, but of no flow: never leaves un-NATed */
	LB_PASS_VLAN_UNMANAGED = 32,  /* its egress is a VLAN device on an interface lb is not attached to: left to the kernel as it arrived (XDP) */
	LB_FWD_FULLNAT = 33,          /* client -> full-NAT VIP, rewritten to a source address and port -> a backend */
	LB_FWD_FULLNAT_REPLY = 34,    /* backend -> a full-NAT source address and port, rewritten to VIP -> client */
	LB_DROP_SNAT_EXHAUSTED = 35,  /* full NAT: no free source port among the slots a new flow may take */
	LB_REASON_MAX = 36,           /* one past the last value: the size of reason_stats */
};

#endif
