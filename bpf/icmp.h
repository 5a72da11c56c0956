/* ICMP the data plane answers itself: echo requests to a VIP (ICMP and ICMPv6). */
#ifndef LB_ICMP_H
#define LB_ICMP_H

#include <linux/icmp.h>
#include <linux/icmpv6.h>
#include "csum.h"
#include "parse.h"

static __always_inline void swap_macs(struct packet *pkt)
{
	__u8 mac[6];

	__builtin_memcpy(mac, pkt->eth->h_source, 6);
	__builtin_memcpy(pkt->eth->h_source, pkt->eth->h_dest, 6);
	__builtin_memcpy(pkt->eth->h_dest, mac, 6);
}

/* The echo reply type replaces the request's; type and code share a word of the checksum. */
static __always_inline void icmp_set_type(struct icmphdr *icmp, __u8 type)
{
	__u16 old = *(__u16 *)icmp;

	icmp->type = type;
	lb_csum_replace2(&icmp->checksum, old, *(__u16 *)icmp);
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
static __always_inline void icmp6_echo_reply(struct packet *pkt)
{
	struct ipv6hdr *ip6 = pkt->ip6;
	struct in6_addr addr = ip6->saddr;

	swap_macs(pkt);
	ip6->saddr = ip6->daddr;
	ip6->daddr = addr;
	ip6->hop_limit = LB_ICMP_TTL;
	icmp_set_type(pkt->icmp, ICMPV6_ECHO_REPLY);
}

/* ICMP: swap MACs and addresses (the IP checksum does not change), reset
 * the TTL, type 8 -> 0. */
static __always_inline void icmp4_echo_reply(struct packet *pkt)
{
	struct iphdr *ip4 = pkt->ip4;
	__be32 addr = ip4->saddr;
	__u16 old_ttl = *(__u16 *)&ip4->ttl; /* ttl and protocol share a 16-bit word */

	swap_macs(pkt);
	ip4->saddr = ip4->daddr;
	ip4->daddr = addr;
	ip4->ttl = LB_ICMP_TTL;
	lb_csum_replace2(&ip4->check, old_ttl, *(__u16 *)&ip4->ttl);
	icmp_set_type(pkt->icmp, ICMP_ECHOREPLY);
}

static __always_inline void icmp_echo_reply(struct packet *pkt)
{
	if (pkt->ip_version == 6)
		icmp6_echo_reply(pkt);
	else
		icmp4_echo_reply(pkt);
}

#endif
