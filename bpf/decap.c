/* Decapsulation for the backends of tunnel-mode VIPs (this kernel has no
 * ipip/ip6tnl devices): an IPIP (IPv4 in IPv4) or IPv6-in-IPv6 packet whose
 * outer destination is one of this host's addresses loses its outer header
 * and goes on to the kernel as the client's own packet, which the backend
 * answers directly. Everything else passes untouched.
 *
 * Only packets for a VIP this host serves are unwrapped: a tunnel packet whose
 * inner destination is not in decap_vips, or whose outer source is outside
 * decap_sources, is dropped and counted. Otherwise anyone reaching the host
 * could inject packets with any inner source and destination (past the LB's
 * ACLs, and on to other networks when the host forwards).
 *
 * Frames with a VLAN tag pass untouched (decapsulate on the VLAN's interface).
 *
 * Two entry points on one parser: xdp_decap (native XDP) and tc_decap (TC
 * ingress, direct action) for interfaces without native XDP. Compiled by bcc
 * with DECAP_PIN_DIR; no map of the load balancer is needed. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include "structs.h"

#ifndef DECAP_PIN_DIR
#define DECAP_PIN_DIR "/sys/fs/bpf/lb-decap/default"
#endif
#define DECAP_PIN(name) DECAP_PIN_DIR "/" #name
#define DECAP_MAX_ADDRS 1024

#define DECAP_MAX_SOURCES 1024

/* decap_stats keys (append only: lb/decap.py names them) */
#define DECAP_IPV4 0           /* IPIP packets decapsulated */
#define DECAP_IPV6 1           /* IPv6-in-IPv6 packets decapsulated */
#define DECAP_REFUSED_NOT_VIP 2 /* dropped: inner destination not a VIP this host serves */
#define DECAP_REFUSED_SOURCE 3  /* dropped: outer source outside the allowed prefixes */
#define DECAP_NR_COUNTERS 4

/* Written by lbctl decap attach (all IPv4-mapped like the LB's): this host's
 * addresses, the VIPs it serves, and the outer sources allowed (::/0 when any). */
BPF_TABLE_PINNED("hash", union lb_addr, __u32, decap_addrs, DECAP_MAX_ADDRS, DECAP_PIN(decap_addrs));
BPF_TABLE_PINNED("hash", union lb_addr, __u32, decap_vips, DECAP_MAX_ADDRS, DECAP_PIN(decap_vips));
BPF_TABLE_PINNED("lpm_trie", struct route_key, __u32, decap_sources, DECAP_MAX_SOURCES, DECAP_PIN(decap_sources),
		 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("percpu_array", __u32, __u64, decap_stats, DECAP_NR_COUNTERS, DECAP_PIN(decap_stats));

/* A tunnel packet: how long its outer header is, where it came from and was
 * sent, and where the packet inside goes. */
struct outer {
	int len;         /* 0: not a tunnel packet this program strips */
	__u32 family;    /* DECAP_IPV4 or DECAP_IPV6 */
	union lb_addr src;
	union lb_addr dst;
	union lb_addr inner_dst; /* all zero when the inner header is not of the outer's family */
};

static __always_inline void mapped(union lb_addr *a, __be32 v4)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = bpf_htonl(0x0000ffff);
	a->w[3] = v4;
}

static __always_inline void parse_outer(void *data, void *data_end, struct outer *o)
{
	struct ethhdr *eth = data;

	o->len = 0;
	if ((void *)(eth + 1) > data_end)
		return;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		/* no options, no fragment, and room for the inner IPv4 header */
		struct iphdr *inner = ip + 1;

		if ((void *)ip + 2 * sizeof(*ip) > data_end || ip->ihl != 5 || ip->protocol != IPPROTO_IPIP ||
		    (ip->frag_off & bpf_htons(0x3fff)))
			return;
		mapped(&o->src, ip->saddr);
		mapped(&o->dst, ip->daddr);
		if (inner->version == 4)
			mapped(&o->inner_dst, inner->daddr);
		o->family = DECAP_IPV4;
		o->len = sizeof(*ip);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		struct ipv6hdr *inner = ip6 + 1;

		if ((void *)ip6 + 2 * sizeof(*ip6) > data_end || ip6->nexthdr != IPPROTO_IPV6)
			return;
		__builtin_memcpy(&o->src, &ip6->saddr, 16);
		__builtin_memcpy(&o->dst, &ip6->daddr, 16);
		if (inner->version == 6)
			__builtin_memcpy(&o->inner_dst, &inner->daddr, 16);
		o->family = DECAP_IPV6;
		o->len = sizeof(*ip6);
	}
}

static __always_inline void count_decap(__u32 key)
{
	__u64 *count = decap_stats.lookup(&key);

	if (count)
		*count += 1;
}

#define PASS 0  /* not a tunnel packet for this host: untouched */
#define STRIP 1 /* a tunnel packet for a served VIP: unwrap it */
#define REFUSE 2 /* a tunnel packet for this host that must not be unwrapped: drop (counted) */

/* What to do with a packet; *family says the outer header's length. */
static __always_inline int to_strip(void *data, void *data_end, __u32 *family)
{
	struct outer o = {};
	struct route_key source = {.prefixlen = 128};

	parse_outer(data, data_end, &o);
	/* map lookups stay in this file: bcc rewrites them only here */
	if (!o.len || !decap_addrs.lookup(&o.dst))
		return PASS;
	source.addr = o.src;
	if (!decap_sources.lookup(&source)) {
		count_decap(DECAP_REFUSED_SOURCE);
		return REFUSE;
	}
	if (!decap_vips.lookup(&o.inner_dst)) {
		count_decap(DECAP_REFUSED_NOT_VIP);
		return REFUSE;
	}
	*family = o.family;
	return STRIP;
}

/* len is a constant in each inlined copy: the verifier keeps the bounds. */
static __always_inline int xdp_strip(struct xdp_md *ctx, int len, __u32 family)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;

	/* the Ethernet header moves forward over the outer header (they do not overlap) */
	if (data + len + sizeof(struct ethhdr) > data_end)
		return XDP_PASS;
	__builtin_memcpy(data + len, data, sizeof(struct ethhdr));
	if (bpf_xdp_adjust_head(ctx, len))
		return XDP_DROP;
	count_decap(family);
	return XDP_PASS;
}

int xdp_decap(struct xdp_md *ctx)
{
	__u32 family = 0;
	int verdict = to_strip((void *)(long)ctx->data, (void *)(long)ctx->data_end, &family);

	if (verdict == PASS)
		return XDP_PASS;
	if (verdict == REFUSE)
		return XDP_DROP;
	if (family == DECAP_IPV6)
		return xdp_strip(ctx, sizeof(struct ipv6hdr), family);
	return xdp_strip(ctx, sizeof(struct iphdr), family);
}

int tc_decap(struct __sk_buff *skb)
{
	__u32 family = 0;
	int verdict = to_strip((void *)(long)skb->data, (void *)(long)skb->data_end, &family);

	if (verdict == PASS)
		return TC_ACT_OK;
	if (verdict == REFUSE)
		return TC_ACT_SHOT;
	int len = family == DECAP_IPV6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr);

	/* remove len bytes right after the MAC header: the outer IP header. FIXED_GSO:
	 * a GRO'd packet's segments keep their size (without it the kernel would
	 * raise gso_size by len, as if each segment's headers had shrunk). */
	if (bpf_skb_adjust_room(skb, -len, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO))
		return TC_ACT_SHOT;
	count_decap(family);
	return TC_ACT_OK;
}
