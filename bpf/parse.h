/* Header parsing with the bounds checks the verifier wants. */
#ifndef LB_PARSE_H
#define LB_PARSE_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/icmpv6.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmp.h>
#include "ctx.h"
#include "structs.h"
#include "consts.h"

#define LB_PARSE_OK -1

struct vlan_hdr {
	__be16 tci;
	__be16 encap_proto;
};

/* What the program needs of a packet, parsed once. */
struct packet {
	struct ethhdr *eth;
	struct iphdr *ip4;   /* set when ip_version is 4 */
	struct ipv6hdr *ip6; /* set when ip_version is 6 */
	__u8 ip_version;     /* 0 until the addresses are known; a scalar the verifier can follow */
	__be16 *l4_ports; /* [0] source, [1] destination (TCP and UDP) */
	__u16 *l4_check;  /* NULL: UDP without checksum */
	struct icmphdr *icmp;     /* ICMP, or ICMPv6 (same first four bytes) */
	union lb_addr src;
	union lb_addr dst;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 tcp_flags;   /* TCP: the header's flags byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10) */
	__u32 len;
	__u16 l3_off; /* where the IP header starts (the TC build's checksum helpers work by offset) */
	__u16 l4_off; /* where the L4 header starts */
};

static __always_inline void addr_from_ipv4(union lb_addr *a, __be32 v4)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = bpf_htonl(0x0000ffff);
	a->w[3] = v4;
}

/* ::ffff:a.b.c.d, the form lb_addr gives IPv4 addresses */
static __always_inline int addr_is_v4_mapped(const union lb_addr *a)
{
	return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == bpf_htonl(0x0000ffff);
}

/* TCP, UDP or the ICMP of the IP version (icmp_proto) at cursor. */
static __always_inline int parse_l4(struct packet *pkt, void *cursor, void *data_end, __u8 icmp_proto)
{
	if (pkt->proto == IPPROTO_TCP) {
		struct tcphdr *tcp = cursor;

		if ((void *)(tcp + 1) > data_end)
			return LB_PASS_MALFORMED;
		pkt->l4_ports = (__be16 *)tcp;
		pkt->l4_check = &tcp->check;
		pkt->tcp_flags = ((__u8 *)tcp)[13];
	} else if (pkt->proto == IPPROTO_UDP) {
		struct udphdr *udp = cursor;

		if ((void *)(udp + 1) > data_end)
			return LB_PASS_MALFORMED;
		pkt->l4_ports = (__be16 *)udp;
		pkt->l4_check = udp->check ? &udp->check : NULL;
	} else if (pkt->proto == icmp_proto) {
		struct icmphdr *icmp = cursor;

		if ((void *)(icmp + 1) > data_end)
			return LB_PASS_MALFORMED;
		pkt->icmp = icmp;
		return LB_PARSE_OK;
	} else {
		return LB_PASS_UNSUPPORTED_L4;
	}
	pkt->sport = pkt->l4_ports[0];
	pkt->dport = pkt->l4_ports[1];
	return LB_PARSE_OK;
}

/* IPv6 without extension headers: a fragment header is a fragment, any
 * other extension header counts as options. */
static __always_inline int parse_ipv6(struct packet *pkt, void *cursor, void *data_end)
{
	struct ipv6hdr *ip6 = cursor;

	if ((void *)(ip6 + 1) > data_end)
		return LB_PASS_MALFORMED;
	pkt->ip6 = ip6;
	pkt->l4_off = pkt->l3_off + sizeof(*ip6);
	pkt->ip_version = 6;
	pkt->proto = ip6->nexthdr;
	__builtin_memcpy(&pkt->src, &ip6->saddr, 16);
	__builtin_memcpy(&pkt->dst, &ip6->daddr, 16);
	if (ip6->version != 6)
		return LB_PASS_MALFORMED;
	/* lb stores IPv4 as mapped: such an address would pass for an IPv4 VIP, client or backend */
	if (addr_is_v4_mapped(&pkt->src) || addr_is_v4_mapped(&pkt->dst))
		return LB_PASS_V4_MAPPED;
	if (ip6->nexthdr == IPPROTO_FRAGMENT)
		return LB_PASS_FRAGMENT;
	if (ip6->nexthdr == IPPROTO_HOPOPTS || ip6->nexthdr == IPPROTO_ROUTING || ip6->nexthdr == IPPROTO_DSTOPTS)
		return LB_PASS_IP_OPTIONS;
	return parse_l4(pkt, ip6 + 1, data_end, IPPROTO_ICMPV6);
}

/* Returns LB_PARSE_OK, or the reason the packet is not ours to balance. */
static __always_inline int parse_packet(lb_ctx *ctx, struct packet *pkt)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	void *cursor = eth + 1;
	__be16 proto;

	if (cursor > data_end)
		return LB_PASS_MALFORMED;
	pkt->eth = eth;
	pkt->len = data_end - data;
	pkt->l3_off = sizeof(*eth);
	proto = eth->h_proto;
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD)) {
		struct vlan_hdr *vlan = cursor;

		if ((void *)(vlan + 1) > data_end)
			return LB_PASS_MALFORMED;
		proto = vlan->encap_proto;
		cursor = vlan + 1;
		pkt->l3_off += sizeof(*vlan);
	}
	if (proto == bpf_htons(ETH_P_IPV6))
		return parse_ipv6(pkt, cursor, data_end);
	if (proto != bpf_htons(ETH_P_IP))
		return LB_PASS_NOT_IP;

	struct iphdr *ip4 = cursor;

	if ((void *)(ip4 + 1) > data_end)
		return LB_PASS_MALFORMED;
	/* From here the addresses are known: the caller can tell whether a
	 * packet it cannot balance was meant for a VIP. */
	pkt->ip4 = ip4;
	pkt->ip_version = 4;
	pkt->l4_off = pkt->l3_off + sizeof(*ip4);
	pkt->proto = ip4->protocol;
	addr_from_ipv4(&pkt->src, ip4->saddr);
	addr_from_ipv4(&pkt->dst, ip4->daddr);
	if (ip4->version != 4 || ip4->ihl < 5)
		return LB_PASS_MALFORMED;
	if (ip4->ihl != 5)
		return LB_PASS_IP_OPTIONS;
	/* any fragment: MF set or a non-zero offset */
	if (ip4->frag_off & bpf_htons(0x3fff))
		return LB_PASS_FRAGMENT;
	return parse_l4(pkt, ip4 + 1, data_end, IPPROTO_ICMP);
}

#ifdef LB_HOOK_TC
/* The skb helpers that change a packet (bpf_l4_csum_replace...) leave every
 * pointer into it stale: find the headers again where parse_packet found
 * them. The addresses and ports pkt holds stay those it arrived with. */
static __always_inline int packet_reload(lb_ctx *ctx, struct packet *pkt)
{
	lb_ctx *skb = ctx;

	/* read the skb's fields right here: a compiler that keeps &ctx->data in a
	 * register over the helpers' calls gets "dereference of modified ctx ptr" */
	asm volatile("" : "+r"(skb));
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	void *l3 = data + (pkt->l3_off & 0x3f); /* bounded for the verifier: 14 or 18 */
	void *l4 = data + (pkt->l4_off & 0x7f); /* at most 18 + 40 */

	if (data + sizeof(struct ethhdr) > data_end)
		return -1;
	pkt->eth = data;
	pkt->ip4 = NULL;
	pkt->ip6 = NULL;
	if (pkt->ip_version == 6) {
		if (l3 + sizeof(struct ipv6hdr) > data_end)
			return -1;
		pkt->ip6 = l3;
	} else {
		if (l3 + sizeof(struct iphdr) > data_end)
			return -1;
		pkt->ip4 = l3;
	}
	pkt->icmp = NULL;
	pkt->l4_ports = NULL;
	pkt->l4_check = NULL;
	if (pkt->proto == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;

		if ((void *)(tcp + 1) > data_end)
			return -1;
		pkt->l4_ports = (__be16 *)tcp;
		pkt->l4_check = &tcp->check;
	} else if (pkt->proto == IPPROTO_UDP) {
		struct udphdr *udp = l4;

		if ((void *)(udp + 1) > data_end)
			return -1;
		pkt->l4_ports = (__be16 *)udp;
		pkt->l4_check = udp->check ? &udp->check : NULL;
	} else {
		struct icmphdr *icmp = l4;

		if ((void *)(icmp + 1) > data_end)
			return -1;
		pkt->icmp = icmp;
	}
	return 0;
}
#endif

#endif
