/* TC egress: the LB host's own connection to a VIP, marked for one backend
 * (skb->mark = LB_MARK_MAGIC | backend id, e.g. a health checker's SO_MARK),
 * goes to that backend as the VIP's mode sends a client's: NAT's rewrite is
 * here; DSR's packet leaves unchanged with the backend as next hop (below);
 * tunnel encapsulates (tunnel.h). NAT's rewrite goes through the skb
 * helpers, not direct writes: a locally generated packet may carry a partial
 * L4 checksum (CHECKSUM_PARTIAL), which bpf_l4_csum_replace() keeps right and
 * an RFC 1624 update would not. TC build only. */
#ifndef LB_STEER_H
#define LB_STEER_H
#ifdef LB_HOOK_TC

#include "ctx.h"
#include "parse.h"

/* The backend a packet's mark names, or LB_NO_BACKEND. */
static __always_inline __u32 steer_backend_id(const struct __sk_buff *skb)
{
	if ((skb->mark & LB_MARK_MAGIC_MASK) != LB_MARK_MAGIC)
		return LB_NO_BACKEND;
	return skb->mark & LB_MARK_BACKEND_MASK;
}

/* One 32-bit word of the destination address; the IPv4 header checksum when ip_check_off is set. */
static __always_inline void steer_replace_word(struct __sk_buff *skb, __u32 off, __be32 from, __be32 to,
					       __u32 ip_check_off, __u32 l4_check_off, __u64 l4_flags)
{
	bpf_skb_store_bytes(skb, off, &to, 4, 0);
	if (ip_check_off)
		bpf_l3_csum_replace(skb, ip_check_off, from, to, 4);
	if (l4_check_off)
		bpf_l4_csum_replace(skb, l4_check_off, from, to, l4_flags | BPF_F_PSEUDO_HDR | 4);
}

/* LB host -> VIP becomes LB host -> backend. The packet's pointers are stale afterwards. */
static __always_inline void steer_rewrite_destination(struct __sk_buff *skb, const struct packet *pkt,
						      const struct backend *be)
{
	void *data = (void *)(long)skb->data;
	__u32 l4_check_off = pkt->l4_check ? (void *)pkt->l4_check - data : 0;
	__u32 port_off = (void *)&pkt->l4_ports[1] - data;
	__u64 l4_flags = pkt->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	union lb_addr addr = be->addr;
	__be16 port = be->port;

	if (pkt->ip4) {
		steer_replace_word(skb, (void *)&pkt->ip4->daddr - data, pkt->dst.w[3], addr.w[3],
				   (void *)&pkt->ip4->check - data, l4_check_off, l4_flags);
	} else if (pkt->ip6) {
		__u32 off = (void *)&pkt->ip6->daddr - data;

#pragma unroll
		for (int i = 0; i < 4; i++)
			steer_replace_word(skb, off + 4 * i, pkt->dst.w[i], addr.w[i], 0, l4_check_off, l4_flags);
	}
	if (port) { /* 0: the backend takes the VIP's port */
		bpf_skb_store_bytes(skb, port_off, &port, 2, 0);
		if (l4_check_off)
			bpf_l4_csum_replace(skb, l4_check_off, pkt->dport, port, l4_flags | 2);
	}
}

/* Out of ifindex to next hop `via` (the kernel resolves its MAC), whatever the destination. */
static __always_inline long steer_redirect_via(__u32 ifindex, const union lb_addr *via, int ip_version)
{
	struct bpf_redir_neigh nh = {};

	if (ip_version == 6) {
		nh.nh_family = 10; /* AF_INET6 */
		__builtin_memcpy(nh.ipv6_nh, via, 16);
	} else {
		nh.nh_family = 2; /* AF_INET */
		nh.ipv4_nh = via->w[3];
	}
	return lb_redirect_neigh(ifindex, &nh, sizeof(nh), 0);
}

#endif
#endif
