/* NAT rewrites: one address and one port, checksums updated incrementally. */
#ifndef LB_NAT_H
#define LB_NAT_H

#include "csum.h"
#include "parse.h"

/* A UDP checksum that computes to zero is sent as all ones (RFC 768). */
static __always_inline void l4_csum_replace4(struct packet *pkt, __be32 from, __be32 to)
{
	if (pkt->l4_check) {
		lb_csum_replace4(pkt->l4_check, from, to);
		if (pkt->proto == IPPROTO_UDP && *pkt->l4_check == 0)
			*pkt->l4_check = 0xffff;
	}
}

static __always_inline void l4_csum_replace2(struct packet *pkt, __be16 from, __be16 to)
{
	if (pkt->l4_check) {
		lb_csum_replace2(pkt->l4_check, from, to);
		if (pkt->proto == IPPROTO_UDP && *pkt->l4_check == 0)
			*pkt->l4_check = 0xffff;
	}
}

/* Each helper replaces one field and keeps the checksums that cover it right. */

static __always_inline void nat_port(struct packet *pkt, __be16 *port, __be16 new_port)
{
	__be16 old_port = *port;

	if (!new_port) /* 0: the VIP takes every port, the port stays */
		return;
	*port = new_port;
	l4_csum_replace2(pkt, old_port, new_port);
}

static __always_inline void nat_addr4(struct packet *pkt, __be32 *addr, __be32 new_addr)
{
	__be32 old_addr = *addr;

	*addr = new_addr;
	lb_csum_replace4(&pkt->ip4->check, old_addr, new_addr);
	l4_csum_replace4(pkt, old_addr, new_addr);
}

/* IPv6 has no header checksum; the L4 one covers the address, word by word. */
static __always_inline void nat_addr6(struct packet *pkt, __be32 *addr, const union lb_addr *new_addr)
{
#pragma unroll
	for (int i = 0; i < 4; i++) {
		__be32 old_word = addr[i];

		addr[i] = new_addr->w[i];
		l4_csum_replace4(pkt, old_word, new_addr->w[i]);
	}
}

/* client -> VIP becomes client -> backend */
static __always_inline void nat_rewrite_destination(struct packet *pkt, const struct backend *be)
{
	if (pkt->ip_version == 6)
		nat_addr6(pkt, pkt->ip6->daddr.in6_u.u6_addr32, &be->addr);
	else
		nat_addr4(pkt, &pkt->ip4->daddr, be->addr.w[3]);
	nat_port(pkt, &pkt->l4_ports[1], be->port);
}

/* backend -> client becomes VIP -> client */
static __always_inline void nat_rewrite_source(struct packet *pkt, const struct vip_meta *vip)
{
	if (pkt->ip_version == 6)
		nat_addr6(pkt, pkt->ip6->saddr.in6_u.u6_addr32, &vip->addr);
	else
		nat_addr4(pkt, &pkt->ip4->saddr, vip->addr.w[3]);
	nat_port(pkt, &pkt->l4_ports[0], vip->port);
}

#endif
