/* Room for an outer header between a packet's L2 header and its IP header:
 * the only hook-specific step of encapsulation. */
#ifndef LB_ENCAP_H
#define LB_ENCAP_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include "ctx.h"
#include "parse.h" /* struct vlan_hdr */

#ifdef LB_HOOK_TC
/* The kernel inserts the room after the MAC header and, told what is inserted,
 * keeps a GSO packet segmentable by its inner headers. */
static __always_inline int encap_grow_head(lb_ctx *ctx, int len, int l2_len, int v6)
{
	__u64 flags = v6 ? BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 : BPF_F_ADJ_ROOM_ENCAP_L3_IPV4;

	return bpf_skb_adjust_room(ctx, len, BPF_ADJ_ROOM_MAC, flags) ? -1 : 0;
}
#else
/* XDP grows the front only: move the L2 header (14 bytes, 18 with a VLAN tag)
 * to the new front. */
static __always_inline int encap_grow_head(lb_ctx *ctx, int len, int l2_len, int v6)
{
	if (bpf_xdp_adjust_head(ctx, -len))
		return -1;
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;

	if (data + len + sizeof(struct ethhdr) + sizeof(struct vlan_hdr) > data_end)
		return -1;
	__builtin_memcpy(data, data + len, sizeof(struct ethhdr));
	if (l2_len > sizeof(struct ethhdr))
		__builtin_memcpy(data + sizeof(struct ethhdr), data + len + sizeof(struct ethhdr),
				 sizeof(struct vlan_hdr));
	return 0;
}
#endif

#endif
