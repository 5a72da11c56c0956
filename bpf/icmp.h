/* ICMP the data plane answers itself: echo requests to a VIP. */
#ifndef LB_ICMP_H
#define LB_ICMP_H

#include <linux/icmp.h>
#include "csum.h"
#include "parse.h"

/* Turn an echo request into its reply in place: swap MACs and addresses
 * (the IP checksum does not change), reset the TTL, type 8 -> 0. */
static __always_inline void icmp_echo_reply(struct packet *pkt)
{
	struct iphdr *ip4 = pkt->ip4;
	struct icmphdr *icmp = pkt->icmp;
	__u8 mac[6];
	__be32 addr = ip4->saddr;
	__u16 old_ttl = *(__u16 *)&ip4->ttl; /* ttl and protocol share a 16-bit word */

	__builtin_memcpy(mac, pkt->eth->h_source, 6);
	__builtin_memcpy(pkt->eth->h_source, pkt->eth->h_dest, 6);
	__builtin_memcpy(pkt->eth->h_dest, mac, 6);
	ip4->saddr = ip4->daddr;
	ip4->daddr = addr;
	ip4->ttl = LB_ICMP_TTL;
	lb_csum_replace2(&ip4->check, old_ttl, *(__u16 *)&ip4->ttl);

	__u16 old_type = *(__u16 *)icmp; /* type and code */

	icmp->type = ICMP_ECHOREPLY;
	lb_csum_replace2(&icmp->checksum, old_type, *(__u16 *)icmp);
}

#endif
