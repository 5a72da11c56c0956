/* Tunnel mode: the client's packet, untouched, inside an outer IP header to
 * the backend (IPIP for IPv4, IPv6-in-IPv6 for IPv6). Backends strip it with
 * bpf/decap.c (lbctl decap attach) or an ipip/ip6tnl device.
 *
 * The outer source is a fixed prefix plus bits of the client's address and
 * port (as Katran does): a backend's NIC spreads received tunnel packets over
 * its queues by the outer addresses (it cannot see the inner ports), so varying
 * the source per client spreads them, while every packet of one flow keeps one
 * source (one queue, no reordering). It is a pure function of the flow, which
 * the reference model computes too. */
#ifndef LB_TUNNEL_H
#define LB_TUNNEL_H

#include "consts.h"
#include "csum.h"
#include "encap.h"
#include "parse.h"

#define LB_IP_DF 0x4000

/* 172.16.x.y: x.y = the client's low 16 address bits XOR its source port */
static __always_inline __be32 encap_source4(const struct packet *pkt)
{
	__u32 low = (bpf_ntohl(pkt->src.w[3]) ^ bpf_ntohs(pkt->sport)) & 0xffff;

	return bpf_htonl(LB_ENCAP_SRC4_PREFIX | low);
}

/* fd00:6c62::/96 + the client's low 32 address bits XOR its source port */
static __always_inline void encap_source6(const struct packet *pkt, struct in6_addr *src)
{
	src->in6_u.u6_addr32[0] = bpf_htonl(LB_ENCAP_SRC6_PREFIX);
	src->in6_u.u6_addr32[1] = 0;
	src->in6_u.u6_addr32[2] = 0;
	src->in6_u.u6_addr32[3] = bpf_htonl(bpf_ntohl(pkt->src.w[3]) ^ bpf_ntohs(pkt->sport));
}

/* The header's checksum is summed from the values written, not read back
 * from the packet (16-bit words as they lie in memory: network order). */
static __always_inline void encap_fill4(struct iphdr *outer, const struct iphdr *inner, const struct packet *pkt,
					const struct backend *be)
{
	__u8 tos = inner->tos;
	__be16 tot_len = bpf_htons(bpf_ntohs(inner->tot_len) + sizeof(struct iphdr));
	__be16 frag_off = inner->frag_off & bpf_htons(LB_IP_DF);
	__be32 saddr = encap_source4(pkt), daddr = be->addr.w[3];
	/* words 0 (version, IHL, TOS) and 4 (TTL, protocol); the id and the check field are zero */
	__u32 sum = bpf_htons(0x4500 | tos) + tot_len + frag_off + bpf_htons((LB_ENCAP_TTL << 8) | IPPROTO_IPIP);

	sum = csum_add_word32(sum, saddr);
	sum = csum_add_word32(sum, daddr);
	*(__u8 *)outer = 0x45; /* version 4, IHL 5: one store, where the bit-fields would read the byte first */
	outer->tos = tos;
	outer->tot_len = tot_len;
	outer->id = 0;
	outer->frag_off = frag_off;
	outer->ttl = LB_ENCAP_TTL;
	outer->protocol = IPPROTO_IPIP;
	outer->check = ~csum_fold32(sum) & 0xffff;
	outer->saddr = saddr;
	outer->daddr = daddr;
}

/* Version, traffic class and flow label are the inner packet's. */
static __always_inline void encap_fill6(struct ipv6hdr *outer, const struct ipv6hdr *inner, const struct packet *pkt,
					const struct backend *be)
{
	__builtin_memcpy(outer, inner, 4);
	outer->payload_len = bpf_htons(bpf_ntohs(inner->payload_len) + sizeof(struct ipv6hdr));
	outer->nexthdr = IPPROTO_IPV6;
	outer->hop_limit = LB_ENCAP_TTL;
	encap_source6(pkt, &outer->saddr);
	__builtin_memcpy(&outer->daddr, &be->addr, 16);
}

/* Put the outer header in front of the IP header, behind the Ethernet header
 * (and VLAN tag); pkt->eth and the IP header pointer follow. 0 on success. */
static __always_inline int tunnel_encap(lb_ctx *ctx, struct packet *pkt, const struct backend *be)
{
	int v6 = pkt->ip_version == 6;
	int outer_len = v6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr);
	int l2_len = pkt->l3_off == sizeof(struct ethhdr) ? sizeof(struct ethhdr)
							   : sizeof(struct ethhdr) + sizeof(struct vlan_hdr); /* tagged */

	if (encap_grow_head(ctx, outer_len, l2_len, v6))
		return -1;
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	void *l3 = data + l2_len;

	if (data + sizeof(struct ethhdr) > data_end)
		return -1;
	pkt->eth = data;
	if (v6) {
		struct ipv6hdr *outer = l3;

		if ((void *)(outer + 2) > data_end)
			return -1;
		encap_fill6(outer, outer + 1, pkt, be);
		pkt->ip6 = outer;
	} else {
		struct iphdr *outer = l3;

		if ((void *)(outer + 2) > data_end)
			return -1;
		encap_fill4(outer, outer + 1, pkt, be);
		pkt->ip4 = outer;
	}
	return 0;
}

#endif
