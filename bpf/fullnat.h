/* Full NAT: a client's packet leaves as (source address, source port) ->
 * backend, the source taken from the VIP's pool (snat_pools), so the
 * backend's replies come back to the LB wherever its routes go; a reply is
 * rewritten to VIP -> client. Two maps hold a flow: fullnat_flows by the
 * client's tuple (the flow entry as conn_table's, and its source port), and
 * fullnat_ports by the reply's tuple (who owns the port). The map calls are
 * in lb.c (bcc rewrites them only there); this header holds the arithmetic
 * and the rewrites.
 *
 * Port allocation: hash, then probe. A new flow tries LB_SNAT_PROBES
 * (address, port) slots of its pool picked by the hash of its tuple (snat_slot),
 * and takes the first whose reverse entry it can insert (BPF_NOEXIST: no
 * lock, and two flows can never share one). A slot whose owner's flow is
 * over (its entry gone, pointing at another port, or idle past its timeout)
 * is taken over. When every probed slot is busy the flow is dropped and
 * counted (LB_DROP_SNAT_EXHAUSTED), never sent with a port in use. */
#ifndef LB_FULLNAT_H
#define LB_FULLNAT_H

/* LB_SNAT_ADDRS is a power of two: an address index is masked with LB_SNAT_ADDRS - 1. */

#include "consts.h"
#include "structs.h"
#include "nat.h"
#include "conn.h"
#include "icmp.h"

/* Slot i of the probe sequence of a flow whose tuple hashes to h: h, then
 * steps of a size the hash also picks (odd), so that flows whose first slots
 * are near do not queue behind one another (as with steps of 1); the pool's
 * addresses take turns over the slots. Returns 0 and the address index and
 * port (network order), or -1 for an empty pool. */
static __always_inline int snat_slot(const struct snat_pool *pool, __u32 h, __u32 i, __u32 *addr_index,
				     __be16 *port)
{
	__u32 count = pool->count, slots = pool->count * pool->port_count;

	if (!count || count > LB_SNAT_ADDRS || !slots)
		return -1;
	__u32 step = (h >> 16) | 1;
	__u32 slot = (h + i * step) % slots, index = slot % count;

	/* the verifier wants the index bounded where it is used: hide from the compiler that it already is */
	asm volatile("" : "+r"(index));
	*addr_index = index & (LB_SNAT_ADDRS - 1);
	*port = bpf_htons((__u16)(pool->port_min + slot / count));
	return 0;
}

static __always_inline int addr_equal(const union lb_addr *a, const union lb_addr *b)
{
	return a->w[0] == b->w[0] && a->w[1] == b->w[1] && a->w[2] == b->w[2] && a->w[3] == b->w[3];
}

/* Does the flow hold this very source (address, port)? */
static __always_inline int fullnat_holds(const struct fullnat_flow *f, const union lb_addr *addr, __be16 port)
{
	return f->snat_port == port && addr_equal(&f->snat_addr, addr);
}

/* The client's tuple of the flow that owns a port: the key of its fullnat_flows entry. */
static __always_inline void fullnat_client_key(struct flow_key *key, const struct fullnat_owner *owner,
					       const union lb_addr *vip_addr, __u8 proto)
{
	key->src = owner->client;
	key->dst = *vip_addr;
	key->sport = owner->client_port;
	key->dport = owner->vip_port;
	key->proto = proto;
}

/* Full NAT's rewrite of both ends: the destination first (address, then the
 * port unless keep_dport), then the source, as the reference model does it.
 * Non-zero: the packet cannot be sent. */
static __always_inline int fullnat_rewrite(lb_ctx *ctx, struct packet *pkt, const union lb_addr *dst, __be16 dport,
					   int keep_dport, const union lb_addr *src, __be16 sport)
{
	struct csum_target t = {};
	union lb_addr from_dst = pkt->dst, from_src = pkt->src;
	__be16 from_dport = pkt->dport, from_sport = pkt->sport;
	int version = pkt->ip_version;

	csum_target_of(&t, pkt);
	if (version == 6) {
		nat_write_addr6(pkt->ip6->daddr.in6_u.u6_addr32, dst);
		nat_write_addr6(pkt->ip6->saddr.in6_u.u6_addr32, src);
	} else {
		pkt->ip4->daddr = dst->w[3];
		pkt->ip4->saddr = src->w[3];
	}
	if (!keep_dport)
		pkt->l4_ports[1] = dport;
	pkt->l4_ports[0] = sport;

	int err = nat_addr_changed(ctx, &t, version, &from_dst, dst);

	if (!keep_dport)
		err |= csum_l4_replace2(ctx, &t, from_dport, dport);
	err |= nat_addr_changed(ctx, &t, version, &from_src, src);
	err |= csum_l4_replace2(ctx, &t, from_sport, sport);
	return nat_done(ctx, pkt, err);
}

/* client -> VIP becomes (source address, port) -> backend (a backend of port
 * 0 keeps the VIP's port). */
static __always_inline int fullnat_rewrite_to_backend(lb_ctx *ctx, struct packet *pkt, const struct backend *be,
						      const union lb_addr *snat_addr, __be16 snat_port)
{
	return fullnat_rewrite(ctx, pkt, &be->addr, be->port, !be->port, snat_addr, snat_port);
}

/* backend -> (source address, port) becomes VIP -> client: the client's
 * address and port, from the VIP's address and the port the client sent to. */
static __always_inline int fullnat_rewrite_to_client(lb_ctx *ctx, struct packet *pkt, const struct fullnat_owner *owner,
						     const union lb_addr *vip_addr)
{
	return fullnat_rewrite(ctx, pkt, &owner->client, owner->client_port, 0, vip_addr, owner->vip_port);
}

/* An ICMP error (path MTU, unreachable, time exceeded) carries an error type? */
static __always_inline int icmp_is_error(const struct packet *pkt)
{
	__u8 type = pkt->icmp->type;

	if (pkt->ip_version == 6)
		return type == ICMPV6_DEST_UNREACH || type == ICMPV6_PKT_TOOBIG || type == ICMPV6_TIME_EXCEED;
	return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED;
}

/* Translate an ICMP error about a full-NAT flow, either way: the outer
 * addresses, then the quote's (its IPv4 header checksum fixed in place: it is
 * ICMP payload) and ports. ICMPv6's checksum covers the outer addresses
 * (pseudo-header), ICMP's does not; the quote's L4 checksum is left as it
 * was (kernels never verify it). Every field is written before any checksum
 * is told (csum.h), in the reference model's order. Non-zero: the packet
 * cannot be sent. */
static __always_inline int fullnat_icmp_rewrite(lb_ctx *ctx, struct packet *pkt, struct icmp_inner *in,
						struct fullnat_icmp *to)
{
	struct csum_target outer = {}, icmp = {};
	__be16 from_sport = in->ports[0], from_dport = in->ports[1];
	__u16 old_check = 0, new_check = 0;
	int version = pkt->ip_version, quote4 = in->ip4 != NULL;

	to->from_src = pkt->src;
	to->from_dst = pkt->dst;
	csum_target_icmp(&icmp, pkt, 0);
	if (version == 6) {
		csum_target_icmp(&outer, pkt, 0);
		nat_write_addr6(pkt->ip6->daddr.in6_u.u6_addr32, &to->outer_dst);
		nat_write_addr6(pkt->ip6->saddr.in6_u.u6_addr32, &to->outer_src);
	} else {
		csum_target_icmp(&outer, pkt, 1);
		outer.l4_check = 0; /* the IPv4 header's checksum only */
		pkt->ip4->daddr = to->outer_dst.w[3];
		pkt->ip4->saddr = to->outer_src.w[3];
	}
	if (quote4) {
		to->old_words[0] = in->src.w[3];
		to->old_words[1] = in->dst.w[3];
		to->new_words[0] = to->quote_src.w[3];
		to->new_words[1] = to->quote_dst.w[3];
	} else {
#pragma unroll
		for (int i = 0; i < 4; i++) {
			to->old_words[i] = in->src.w[i];
			to->old_words[4 + i] = in->dst.w[i];
			to->new_words[i] = to->quote_src.w[i];
			to->new_words[4 + i] = to->quote_dst.w[i];
		}
	}
	/* Test the very pointer used: the verifier cannot tie it to the IP version. */
	if (in->ip4) {
		old_check = in->ip4->check;
		lb_csum_replace4(&in->ip4->check, in->ip4->saddr, to->quote_src.w[3]);
		lb_csum_replace4(&in->ip4->check, in->ip4->daddr, to->quote_dst.w[3]);
		in->ip4->saddr = to->quote_src.w[3];
		in->ip4->daddr = to->quote_dst.w[3];
		new_check = in->ip4->check;
	} else if (in->ip6) {
		nat_write_addr6(in->ip6->saddr.in6_u.u6_addr32, &to->quote_src);
		nat_write_addr6(in->ip6->daddr.in6_u.u6_addr32, &to->quote_dst);
	}
	in->ports[0] = to->quote_sport;
	in->ports[1] = to->quote_dport;

	int err = nat_addr_changed(ctx, &outer, version, &to->from_dst, &to->outer_dst);

	err |= nat_addr_changed(ctx, &outer, version, &to->from_src, &to->outer_src);
	/* The quote's address words, source then destination (one call site: the TC build's helper
	 * calls, unrolled, would spill past the stack) */
	__u32 words = quote4 ? 2 : 8;

	for (__u32 i = 0; i < words && i < 8; i++)
		err |= csum_l4_replace4(ctx, &icmp, to->old_words[i], to->new_words[i]);
	if (quote4)
		err |= csum_l4_replace2(ctx, &icmp, old_check, new_check);
	err |= csum_l4_replace2(ctx, &icmp, from_sport, to->quote_sport);
	err |= csum_l4_replace2(ctx, &icmp, from_dport, to->quote_dport);
	return nat_done(ctx, pkt, err);
}

#endif
