/* 802.1Q / 802.1ad: a forwarded frame carries the tagging of its egress link,
 * not the client's. parse.h skips one tag on the way in; here, once the egress
 * is chosen, the frame gets the egress VLAN's tag (egress_vlans, looked up in
 * lb.c), or loses the client's when the egress is untagged. Untagged frames
 * out of untagged links, the common case, never come here. */
#ifndef LB_VLAN_H
#define LB_VLAN_H

#include <linux/if_ether.h>
#include "ctx.h"
#include "parse.h"
#include "structs.h"

static __always_inline int frame_tagged(const struct packet *pkt)
{
	return pkt->l3_off != sizeof(struct ethhdr);
}

#ifdef LB_HOOK_TC
/* At TC the kernel has already moved a received tag into the skb's metadata
 * (a test run leaves it in the frame): drop it either way. An egress VLAN
 * device is redirected to as it is (any device takes an skb) and tags the
 * frame itself. pkt->eth follows the frame; 0 on success. */
static __always_inline int vlan_untag(lb_ctx *ctx, struct packet *pkt)
{
	if (bpf_skb_vlan_pop(ctx))
		return -1;
	/* the verifier refuses a field address kept from before the helper: read ctx afresh */
	asm volatile("" : "+r"(ctx));
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;

	if (data + sizeof(struct ethhdr) > data_end)
		return -1;
	pkt->eth = data;
	return 0;
}
#else
/* Push, replace or strip the tag in the frame (XDP sees it in the frame). The
 * MACs are left for write_macs; only pkt->eth follows the frame (the other
 * pointers are stale after a push or a strip). 0 on success. */
static __always_inline int vlan_retag(lb_ctx *ctx, struct packet *pkt, const struct egress_vlan *vlan)
{
	int tagged = frame_tagged(pkt);
	int delta = (tagged == (vlan != NULL)) ? 0 : (vlan ? -(int)sizeof(struct vlan_hdr) : (int)sizeof(struct vlan_hdr));

	/* pushing: the old EtherType lands where the tag's encapsulated type goes;
	 * stripping: the tag's encapsulated type lands where the EtherType goes */
	if (delta && bpf_xdp_adjust_head(ctx, delta))
		return -1;
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct vlan_hdr *tag = (void *)(eth + 1);

	if ((void *)(tag + 1) > data_end)
		return -1;
	pkt->eth = eth;
	if (vlan) {
		eth->h_proto = vlan->proto;
		tag->tci = vlan->tci;
	}
	return 0;
}
#endif

#endif
