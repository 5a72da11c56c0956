/* Room for an outer header in front of a packet. The only hook-specific step
 * of encapsulation: a TC (__sk_buff) variant of encap_grow_head goes here. */
#ifndef LB_ENCAP_H
#define LB_ENCAP_H

#include <linux/bpf.h>

/* Grow the packet by len bytes at the front; 0 on success. Every packet
 * pointer is invalid afterwards: re-derive them from ctx. */
static __always_inline int encap_grow_head(struct xdp_md *ctx, int len)
{
	return bpf_xdp_adjust_head(ctx, -len);
}

#endif
