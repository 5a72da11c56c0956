/* Decapsulation for the backends of tunnel-mode VIPs (this kernel has no
 * ipip/ip6tnl devices): an IPIP (IPv4 in IPv4) or IPv6-in-IPv6 packet whose
 * outer destination is one of this host's addresses loses its outer header
 * and goes on to the kernel as the client's own packet, which the backend
 * answers directly. Everything else passes untouched.
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

/* decap_stats keys */
#define DECAP_IPV4 0 /* IPIP packets decapsulated */
#define DECAP_IPV6 1 /* IPv6-in-IPv6 packets decapsulated */

/* this host's addresses (IPv4-mapped like the LB's), written by lbctl decap attach */
BPF_TABLE_PINNED("hash", union lb_addr, __u32, decap_addrs, DECAP_MAX_ADDRS, DECAP_PIN(decap_addrs));
BPF_TABLE_PINNED("percpu_array", __u32, __u64, decap_stats, 2, DECAP_PIN(decap_stats));

/* A tunnel packet: how long its outer header is, and where it was sent. */
struct outer {
	int len;         /* 0: not a tunnel packet this program strips */
	__u32 family;    /* DECAP_IPV4 or DECAP_IPV6 */
	union lb_addr dst;
};

static __always_inline void parse_outer(void *data, void *data_end, struct outer *o)
{
	struct ethhdr *eth = data;

	o->len = 0;
	if ((void *)(eth + 1) > data_end)
		return;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		/* no options, no fragment, and room for the inner IPv4 header */
		if ((void *)ip + 2 * sizeof(*ip) > data_end || ip->ihl != 5 || ip->protocol != IPPROTO_IPIP ||
		    (ip->frag_off & bpf_htons(0x3fff)))
			return;
		o->dst.w[0] = 0;
		o->dst.w[1] = 0;
		o->dst.w[2] = bpf_htonl(0x0000ffff);
		o->dst.w[3] = ip->daddr;
		o->family = DECAP_IPV4;
		o->len = sizeof(*ip);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)ip6 + 2 * sizeof(*ip6) > data_end || ip6->nexthdr != IPPROTO_IPV6)
			return;
		__builtin_memcpy(&o->dst, &ip6->daddr, 16);
		o->family = DECAP_IPV6;
		o->len = sizeof(*ip6);
	}
}

/* Is it a tunnel packet for this host? Its family says the outer header's length. */
static __always_inline int to_strip(void *data, void *data_end, __u32 *family)
{
	struct outer o = {};

	parse_outer(data, data_end, &o);
	/* map lookups stay in this file: bcc rewrites them only here */
	if (!o.len || !decap_addrs.lookup(&o.dst))
		return 0;
	*family = o.family;
	return 1;
}

static __always_inline void count_decap(__u32 family)
{
	__u64 *count = decap_stats.lookup(&family);

	if (count)
		*count += 1;
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

	if (!to_strip((void *)(long)ctx->data, (void *)(long)ctx->data_end, &family))
		return XDP_PASS;
	if (family == DECAP_IPV6)
		return xdp_strip(ctx, sizeof(struct ipv6hdr), family);
	return xdp_strip(ctx, sizeof(struct iphdr), family);
}

int tc_decap(struct __sk_buff *skb)
{
	__u32 family = 0;

	if (!to_strip((void *)(long)skb->data, (void *)(long)skb->data_end, &family))
		return TC_ACT_OK;
	int len = family == DECAP_IPV6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr);

	/* remove len bytes right after the MAC header: the outer IP header. FIXED_GSO:
	 * a GRO'd packet's segments keep their size (without it the kernel would
	 * raise gso_size by len, as if each segment's headers had shrunk). */
	if (bpf_skb_adjust_room(skb, -len, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO))
		return TC_ACT_SHOT;
	count_decap(family);
	return TC_ACT_OK;
}
