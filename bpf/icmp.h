/* ICMP the data plane handles itself: echo requests to a VIP are answered
 * (ICMP and ICMPv6); "fragmentation needed" and "packet too big" about a
 * VIP's flow are parsed here and rewritten for the flow's backend. */
#ifndef LB_ICMP_H
#define LB_ICMP_H

#include <linux/icmp.h>
#include <linux/icmpv6.h>
#include "csum.h"
#include "parse.h"
#include "nat.h"

static __always_inline void swap_macs(struct packet *pkt)
{
	__u8 mac[6];

	__builtin_memcpy(mac, pkt->eth->h_source, 6);
	__builtin_memcpy(pkt->eth->h_source, pkt->eth->h_dest, 6);
	__builtin_memcpy(pkt->eth->h_dest, mac, 6);
}

/* Is this an echo request (ICMP type 8, ICMPv6 type 128)? */
static __always_inline int icmp_is_echo_request(const struct packet *pkt)
{
	return pkt->icmp->type == (pkt->ip_version == 6 ? ICMPV6_ECHO_REQUEST : ICMP_ECHO);
}

/* Neighbour discovery is the kernel's business, whatever the address. */
static __always_inline int icmp_is_neighbour_discovery(const struct packet *pkt)
{
	return pkt->ip_version == 6 && pkt->icmp->type >= 133 && pkt->icmp->type <= 137;
}

/* ICMPv6: swap MACs and addresses (the pseudo-header sum does not change),
 * reset the hop limit (not in the checksum), type 128 -> 129. */
static __always_inline void icmp6_echo_reply_write(struct packet *pkt)
{
	struct ipv6hdr *ip6 = pkt->ip6;
	struct in6_addr addr = ip6->saddr;

	swap_macs(pkt);
	ip6->saddr = ip6->daddr;
	ip6->daddr = addr;
	ip6->hop_limit = LB_ICMP_TTL;
	pkt->icmp->type = ICMPV6_ECHO_REPLY;
}

/* ICMP: swap MACs and addresses (the IP checksum does not change), reset
 * the TTL, type 8 -> 0. */
static __always_inline void icmp4_echo_reply_write(struct packet *pkt)
{
	struct iphdr *ip4 = pkt->ip4;
	__be32 addr = ip4->saddr;

	swap_macs(pkt);
	ip4->saddr = ip4->daddr;
	ip4->daddr = addr;
	ip4->ttl = LB_ICMP_TTL;
	pkt->icmp->type = ICMP_ECHOREPLY;
}

/* The request turned into its reply, in place. The TTL shares a 16-bit word
 * of the IPv4 header with the protocol, the type one of the ICMP message with
 * the code. Non-zero: the packet cannot be sent. (At TC the packet's pointers
 * are stale afterwards: the reply leaves at once.) */
static __always_inline int icmp_echo_reply(lb_ctx *ctx, struct packet *pkt)
{
	struct csum_target t = {};
	__u16 old_ttl = 0, new_ttl = 0;
	__u16 old_type = *(__u16 *)pkt->icmp;

	csum_target_icmp(&t, pkt, 1);
	if (pkt->ip_version == 6) {
		icmp6_echo_reply_write(pkt);
	} else {
		old_ttl = *(__u16 *)&pkt->ip4->ttl;
		icmp4_echo_reply_write(pkt);
		new_ttl = *(__u16 *)&pkt->ip4->ttl;
	}
	__u16 new_type = *(__u16 *)pkt->icmp;

	return csum_l3_replace2(ctx, &t, old_ttl, new_ttl) | csum_l4_replace2(ctx, &t, old_type, new_type);
}

/* ICMP "fragmentation needed" (type 3 code 4), ICMPv6 "packet too big" (type 2):
 * path MTU discovery of a flow's replies. */
static __always_inline int icmp_is_too_big(const struct packet *pkt)
{
	if (pkt->ip_version == 6)
		return pkt->icmp->type == ICMPV6_PKT_TOOBIG && pkt->icmp->code == 0;
	return pkt->icmp->type == ICMP_DEST_UNREACH && pkt->icmp->code == ICMP_FRAG_NEEDED;
}

/* The packet an ICMP error quotes: a reply that left the LB as VIP -> client. */
struct icmp_inner {
	struct iphdr *ip4;   /* set for an ICMP error */
	struct ipv6hdr *ip6; /* set for an ICMPv6 error */
	__be16 *ports;       /* [0] source (the VIP's port), [1] destination (the client's) */
	union lb_addr src;
	union lb_addr dst;
	__u8 proto;
};

/* TCP or UDP, with the quote's first 8 bytes of it (RFC 792 promises them): the ports. */
static __always_inline int icmp_parse_quoted_ports(struct icmp_inner *in, void *cursor, void *data_end)
{
	__be16 *ports = cursor;

	if (in->proto != IPPROTO_TCP && in->proto != IPPROTO_UDP)
		return LB_PASS_UNSUPPORTED_L4;
	if ((void *)(ports + 4) > data_end)
		return LB_PASS_MALFORMED;
	in->ports = ports;
	return LB_PARSE_OK;
}

/* The quoted IPv6 header: no extension headers (a fragment header counts as a fragment). */
static __always_inline int icmp_parse_inner6(struct icmp_inner *in, void *cursor, void *data_end)
{
	struct ipv6hdr *ip6 = cursor;

	if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
		return LB_PASS_MALFORMED;
	if (ip6->nexthdr == IPPROTO_FRAGMENT)
		return LB_PASS_FRAGMENT;
	if (ip6->nexthdr == IPPROTO_HOPOPTS || ip6->nexthdr == IPPROTO_ROUTING || ip6->nexthdr == IPPROTO_DSTOPTS)
		return LB_PASS_IP_OPTIONS;
	in->ip6 = ip6;
	in->proto = ip6->nexthdr;
	__builtin_memcpy(&in->src, &ip6->saddr, 16);
	__builtin_memcpy(&in->dst, &ip6->daddr, 16);
	return icmp_parse_quoted_ports(in, ip6 + 1, data_end);
}

/* The quoted IPv4 header: no options; a fragment other than the first has no ports. */
static __always_inline int icmp_parse_inner4(struct icmp_inner *in, void *cursor, void *data_end)
{
	struct iphdr *ip4 = cursor;

	if ((void *)(ip4 + 1) > data_end || ip4->version != 4 || ip4->ihl < 5)
		return LB_PASS_MALFORMED;
	if (ip4->ihl != 5)
		return LB_PASS_IP_OPTIONS;
	if (ip4->frag_off & bpf_htons(0x1fff))
		return LB_PASS_FRAGMENT;
	in->ip4 = ip4;
	in->proto = ip4->protocol;
	addr_from_ipv4(&in->src, ip4->saddr);
	addr_from_ipv4(&in->dst, ip4->daddr);
	return icmp_parse_quoted_ports(in, ip4 + 1, data_end);
}

/* The packet an ICMP error quotes, up to its ports. Returns LB_PARSE_OK or
 * why the error cannot be matched to a flow. */
static __always_inline int icmp_parse_inner(const struct packet *pkt, void *data_end, struct icmp_inner *in)
{
	void *cursor = pkt->icmp + 1;

	if (pkt->ip_version == 6)
		return icmp_parse_inner6(in, cursor, data_end);
	return icmp_parse_inner4(in, cursor, data_end);
}

/* What rewriting a quote changed, for the ICMP checksum. */
struct quote_change {
	__u8 ip_version; /* the quote's; 0: nothing rewritten */
	__u16 old_check; /* the quoted IPv4 header's checksum, before and after */
	__u16 new_check;
	__be16 old_port;
};

/* The quoted reply's source, VIP -> backend, as the backend sent it; its IPv4
 * header checksum is fixed, its L4 checksum is left as the LB's NAT wrote it
 * (it covers the VIP): kernels never verify the quote's L4 checksum, and a
 * quote is often cut before it. The quote is ICMP payload: its own header
 * checksum is plain data, fixed here in place in both builds. */
static __always_inline void icmp_quote_write_source(struct icmp_inner *in, const struct backend *be,
						    struct quote_change *c)
{
	/* Test the very pointer used: the verifier cannot tie it to the IP version. */
	if (in->ip4) {
		c->ip_version = 4;
		c->old_check = in->ip4->check;
		lb_csum_replace4(&in->ip4->check, in->ip4->saddr, be->addr.w[3]);
		in->ip4->saddr = be->addr.w[3];
		c->new_check = in->ip4->check;
	} else if (in->ip6) {
		c->ip_version = 6;
		nat_write_addr6(in->ip6->saddr.in6_u.u6_addr32, &be->addr);
	} else {
		return;
	}
	c->old_port = in->ports[0];
	if (be->port) /* 0: the backend kept the VIP's port */
		in->ports[0] = be->port;
}

/* The ICMP checksum (t) covers the whole quote: every change to it is folded in. */
static __always_inline int icmp_quote_source_changed(lb_ctx *ctx, const struct csum_target *t,
						     const struct icmp_inner *in, const struct quote_change *c,
						     const struct backend *be)
{
	int err = 0;

	if (c->ip_version == 4) {
		err |= csum_l4_replace4(ctx, t, in->src.w[3], be->addr.w[3]);
		err |= csum_l4_replace2(ctx, t, c->old_check, c->new_check);
	} else if (c->ip_version == 6) {
#pragma unroll
		for (int i = 0; i < 4; i++)
			err |= csum_l4_replace4(ctx, t, in->src.w[i], be->addr.w[i]);
	} else {
		return 0;
	}
	if (be->port)
		err |= csum_l4_replace2(ctx, t, c->old_port, be->port);
	return err;
}

/* NAT mode: the error goes to the backend (outer destination) about its own
 * reply (the quote's source). ICMPv6's checksum covers the outer addresses
 * (pseudo-header), ICMP's does not. Every field is written before any
 * checksum is told (csum.h); each checksum sees its changes in the reference
 * model's order. Non-zero: the packet cannot be sent. */
static __always_inline int icmp_error_rewrite_to_backend(lb_ctx *ctx, struct packet *pkt, struct icmp_inner *in,
							 const struct backend *be)
{
	struct csum_target outer = {}, quote = {};
	struct quote_change change = {};
	union lb_addr from = pkt->dst;
	int version = pkt->ip_version;

	csum_target_icmp(&quote, pkt, 0);
	if (version == 6) {
		csum_target_icmp(&outer, pkt, 0);
		nat_write_addr6(pkt->ip6->daddr.in6_u.u6_addr32, &be->addr);
	} else {
		csum_target_icmp(&outer, pkt, 1);
		outer.l4_check = 0; /* the IPv4 header's checksum only: ICMP's covers no address */
		pkt->ip4->daddr = be->addr.w[3];
	}
	icmp_quote_write_source(in, be, &change);

	int err = nat_addr_changed(ctx, &outer, version, &from, &be->addr);

	err |= icmp_quote_source_changed(ctx, &quote, in, &change, be);
	return nat_done(ctx, pkt, err);
}

#endif
