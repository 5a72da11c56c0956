/* NAT rewrites: one address and one port. The fields are written first, then
 * the checksums that cover them are told what changed (csum.h: in place for
 * XDP, the kernel's helpers at TC, which leave the packet's pointers stale
 * until nat_done finds the headers again). */
#ifndef LB_NAT_H
#define LB_NAT_H

#include "csum.h"
#include "parse.h"

/* The packet's own checksums: the IPv4 header's and its TCP or UDP one. */
static __always_inline void csum_target_of(struct csum_target *t, const struct packet *pkt)
{
#ifdef LB_HOOK_TC
	t->l3_check = pkt->ip_version == 4 ? pkt->l3_off + __builtin_offsetof(struct iphdr, check) : 0;
	t->l4_check = 0;
	if (pkt->l4_check)
		t->l4_check = pkt->l4_off + (pkt->proto == IPPROTO_UDP ? __builtin_offsetof(struct udphdr, check)
								  : __builtin_offsetof(struct tcphdr, check));
	t->l4_flags = pkt->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
#else
	t->l3_check = pkt->ip_version == 4 ? &pkt->ip4->check : NULL;
	t->l4_check = pkt->l4_check;
	t->udp = pkt->proto == IPPROTO_UDP;
#endif
}

/* An ICMP or ICMPv6 message's checksum (and the IPv4 header's, when with_l3). */
static __always_inline void csum_target_icmp(struct csum_target *t, const struct packet *pkt, int with_l3)
{
#ifdef LB_HOOK_TC
	t->l3_check = with_l3 && pkt->ip_version == 4 ? pkt->l3_off + __builtin_offsetof(struct iphdr, check) : 0;
	t->l4_check = pkt->l4_off + __builtin_offsetof(struct icmphdr, checksum);
	t->l4_flags = 0;
#else
	t->l3_check = with_l3 && pkt->ip_version == 4 ? &pkt->ip4->check : NULL;
	t->l4_check = &pkt->icmp->checksum;
	t->udp = 0;
#endif
}

/* A rewrite is over: at TC, find the headers again (the checksum helpers left
 * pkt's pointers stale). Non-zero: the packet cannot be sent. */
static __always_inline int nat_done(lb_ctx *ctx, struct packet *pkt, int err)
{
#ifdef LB_HOOK_TC
	if (err)
		return err;
	return packet_reload(ctx, pkt);
#else
	return err;
#endif
}

static __always_inline void nat_write_addr6(__be32 *addr, const union lb_addr *to)
{
#pragma unroll
	for (int i = 0; i < 4; i++)
		addr[i] = to->w[i];
}

/* An address went from -> to: IPv4 is one word (w[3]), IPv6 four, each in the pseudo-header. */
static __always_inline int nat_addr_changed(lb_ctx *ctx, const struct csum_target *t, int ip_version,
					    const union lb_addr *from, const union lb_addr *to)
{
	if (ip_version == 6)
		return csum_addr6_replace(ctx, t, from->w, to->w);
	return csum_addr_replace4(ctx, t, from->w[3], to->w[3]);
}

/* client -> VIP becomes client -> backend (port 0: the backend takes the VIP's port).
 * Non-zero: the packet cannot be sent. */
static __always_inline int nat_rewrite_destination(lb_ctx *ctx, struct packet *pkt, const struct backend *be)
{
	struct csum_target t = {};
	union lb_addr from = pkt->dst;
	__be16 from_port = pkt->dport;
	int version = pkt->ip_version;

	csum_target_of(&t, pkt);
	if (version == 6)
		nat_write_addr6(pkt->ip6->daddr.in6_u.u6_addr32, &be->addr);
	else
		pkt->ip4->daddr = be->addr.w[3];
	if (be->port)
		pkt->l4_ports[1] = be->port;

	int err = nat_addr_changed(ctx, &t, version, &from, &be->addr);

	if (be->port)
		err |= csum_l4_replace2(ctx, &t, from_port, be->port);
	return nat_done(ctx, pkt, err);
}

/* backend -> client becomes VIP -> client (port 0: the VIP takes every port, the port stays).
 * Non-zero: the packet cannot be sent. */
static __always_inline int nat_rewrite_source(lb_ctx *ctx, struct packet *pkt, const struct vip_meta *vip)
{
	struct csum_target t = {};
	union lb_addr from = pkt->src;
	__be16 from_port = pkt->sport;
	int version = pkt->ip_version;

	csum_target_of(&t, pkt);
	if (version == 6)
		nat_write_addr6(pkt->ip6->saddr.in6_u.u6_addr32, &vip->addr);
	else
		pkt->ip4->saddr = vip->addr.w[3];
	if (vip->port)
		pkt->l4_ports[0] = vip->port;

	int err = nat_addr_changed(ctx, &t, version, &from, &vip->addr);

	if (vip->port)
		err |= csum_l4_replace2(ctx, &t, from_port, vip->port);
	return nat_done(ctx, pkt, err);
}

#endif
