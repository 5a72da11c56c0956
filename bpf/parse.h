/* Header parsing with the bounds checks the verifier wants. */
#ifndef LB_PARSE_H
#define LB_PARSE_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmp.h>
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
	struct iphdr *ip4;
	__be16 *l4_ports; /* [0] source, [1] destination (TCP and UDP) */
	__u16 *l4_check;  /* NULL: UDP without checksum */
	struct icmphdr *icmp;
	union lb_addr src;
	union lb_addr dst;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u32 len;
};

static __always_inline void addr_from_ipv4(union lb_addr *a, __be32 v4)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = bpf_htonl(0x0000ffff);
	a->w[3] = v4;
}

/* Returns LB_PARSE_OK, or the reason the packet is not ours to balance. */
static __always_inline int parse_packet(struct xdp_md *ctx, struct packet *pkt)
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
	proto = eth->h_proto;
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD)) {
		struct vlan_hdr *vlan = cursor;

		if ((void *)(vlan + 1) > data_end)
			return LB_PASS_MALFORMED;
		proto = vlan->encap_proto;
		cursor = vlan + 1;
	}
	if (proto != bpf_htons(ETH_P_IP))
		return LB_PASS_NOT_IP;

	struct iphdr *ip4 = cursor;

	if ((void *)(ip4 + 1) > data_end)
		return LB_PASS_MALFORMED;
	/* From here the addresses are known: the caller can tell whether a
	 * packet it cannot balance was meant for a VIP. */
	pkt->ip4 = ip4;
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
	cursor = ip4 + 1;

	if (ip4->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = cursor;

		if ((void *)(tcp + 1) > data_end)
			return LB_PASS_MALFORMED;
		pkt->l4_ports = (__be16 *)tcp;
		pkt->l4_check = &tcp->check;
	} else if (ip4->protocol == IPPROTO_UDP) {
		struct udphdr *udp = cursor;

		if ((void *)(udp + 1) > data_end)
			return LB_PASS_MALFORMED;
		pkt->l4_ports = (__be16 *)udp;
		pkt->l4_check = udp->check ? &udp->check : NULL;
	} else if (ip4->protocol == IPPROTO_ICMP) {
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

#endif
