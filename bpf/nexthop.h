/* Where a rewritten packet goes next. The control plane's mirror of the
 * kernel's routes and neighbours (the routes map, looked up in lb.c) comes
 * first; the kernel FIB is the fallback. */
#ifndef LB_NEXTHOP_H
#define LB_NEXTHOP_H

#include <linux/bpf.h>
#include "ctx.h"
#include "parse.h"

enum nh_result {
	NH_FOUND,      /* *nh is usable */
	NH_KERNEL,     /* neighbour unresolved: let the kernel forward (it resolves and queues) */
	NH_NO_ROUTE,
};

/* A FIB query for pkt redirected to dst, as if it arrived on ifindex. */
static __always_inline void fib_query(struct bpf_fib_lookup *fib, __u32 ifindex, const struct packet *pkt,
				      const union lb_addr *dst)
{
	fib->l4_protocol = pkt->proto;
	fib->ifindex = ifindex;
	if (pkt->ip_version == 6) {
		fib->family = 10; /* AF_INET6 */
		fib->tot_len = bpf_ntohs(pkt->ip6->payload_len) + sizeof(struct ipv6hdr);
		__builtin_memcpy(fib->ipv6_src, &pkt->ip6->saddr, 16);
		__builtin_memcpy(fib->ipv6_dst, dst, 16);
	} else {
		fib->family = 2; /* AF_INET */
		fib->tot_len = bpf_ntohs(pkt->ip4->tot_len);
		fib->ipv4_src = pkt->ip4->saddr;
		fib->ipv4_dst = dst->w[3];
	}
}

/* Ask the kernel's FIB for the next hop to dst (the route mirror missed). */
static __always_inline int fib_next_hop(lb_ctx *ctx, const struct packet *pkt,
					const union lb_addr *dst, struct next_hop *nh)
{
	struct bpf_fib_lookup fib = {};

	fib_query(&fib, ctx->ingress_ifindex, pkt, dst);
	int rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);

	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		nh->ifindex = fib.ifindex;
		__builtin_memcpy(nh->smac, fib.smac, 6);
		__builtin_memcpy(nh->dmac, fib.dmac, 6);
		return NH_FOUND;
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return NH_KERNEL;
	return NH_NO_ROUTE;
}

static __always_inline void write_macs(struct packet *pkt, const struct next_hop *nh)
{
	__builtin_memcpy(pkt->eth->h_source, nh->smac, 6);
	__builtin_memcpy(pkt->eth->h_dest, nh->dmac, 6);
}

#endif
