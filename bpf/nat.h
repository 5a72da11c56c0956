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

/* Replace one address and one port (port 0: keep it, as for a VIP that
 * takes every port), keeping the IP and L4 checksums right. */
static __always_inline void nat_rewrite(struct packet *pkt, __be32 *addr, __be16 *port,
					__be32 new_addr, __be16 new_port)
{
	__be32 old_addr = *addr;
	__be16 old_port = *port;

	*addr = new_addr;
	lb_csum_replace4(&pkt->ip4->check, old_addr, new_addr);
	l4_csum_replace4(pkt, old_addr, new_addr);
	if (!new_port)
		return;
	*port = new_port;
	l4_csum_replace2(pkt, old_port, new_port);
}

/* client -> VIP becomes client -> backend */
static __always_inline void nat_rewrite_destination(struct packet *pkt, const struct backend *be)
{
	nat_rewrite(pkt, &pkt->ip4->daddr, &pkt->l4_ports[1], be->addr.w[3], be->port);
}

/* backend -> client becomes VIP -> client */
static __always_inline void nat_rewrite_source(struct packet *pkt, const struct vip_meta *vip)
{
	nat_rewrite(pkt, &pkt->ip4->saddr, &pkt->l4_ports[0], vip->addr.w[3], vip->port);
}

#endif
