/* The hook the data plane runs in: XDP (default) or TC ingress (-DLB_HOOK_TC),
 * for interfaces without native XDP. The program is written once against
 * lb_ctx and the LB_ACT_* actions; this header maps them onto each hook.
 * (The entry point keeps its name, xdp_lb, in both builds.)
 * The TC build fixes checksums with the kernel's helpers, right for an skb
 * that still carries a partial checksum (csum.h). */
#ifndef LB_CTX_H
#define LB_CTX_H

#include <uapi/linux/bpf.h>
#include "consts.h"
#include "structs.h"

#ifdef LB_HOOK_TC
#include <uapi/linux/pkt_cls.h>

typedef struct __sk_buff lb_ctx;

#define LB_ACT_PASS TC_ACT_OK
#define LB_ACT_DROP TC_ACT_SHOT
/* Back out of the interface it came in by (XDP_TX). */
#define LB_ACT_TX(ctx) bpf_redirect((ctx)->ingress_ifindex, 0)
/* Out of another interface: any one works for an skb, no DEVMAP slot needed. */
#define LB_ACT_REDIRECT(ifindex) bpf_redirect((ifindex), 0)

/* Out of ifindex, the kernel resolving the neighbour. (bcc's helpers.h
 * declares this helper without its plen argument.) */
static long (*lb_redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) =
	(void *)BPF_FUNC_redirect_neigh;

/* Parsing reads the headers by direct access: they must be in the linear part. */
static __always_inline void lb_ctx_prepare(lb_ctx *ctx)
{
	if ((long)ctx->data_end - (long)ctx->data < ctx->len)
		bpf_skb_pull_data(ctx, ctx->len);
}

/* Probes run the XDP build (BPF_PROG_TEST_RUN): nothing to report here. */
static __always_inline void lb_probe_report(lb_ctx *ctx, __u32 reason)
{
}

#else

typedef struct xdp_md lb_ctx;

#define LB_ACT_PASS XDP_PASS
#define LB_ACT_DROP XDP_DROP
#define LB_ACT_TX(ctx) XDP_TX
/* (XDP redirects through the tx_ports DEVMAP, in lb.c: bcc rewrites map calls only there.) */

static __always_inline void lb_ctx_prepare(lb_ctx *ctx)
{
}

/* A probe asks through the packet's metadata; real traffic carries none, so
 * this costs one compare. */
static __always_inline void lb_probe_report(lb_ctx *ctx, __u32 reason)
{
	struct probe_meta *probe = (void *)(long)ctx->data_meta;

	if ((void *)(probe + 1) <= (void *)(long)ctx->data && probe->magic == LB_PROBE_MAGIC)
		probe->reason = reason;
}

#endif

#endif
