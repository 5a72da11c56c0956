/* Reference programs timed beside the data plane in the same run. */
#include <linux/if_ether.h>

/* The floor: the cost of a test run itself. */
int xdp_drop(struct xdp_md *ctx)
{
	return XDP_DROP;
}

/* The cheapest useful forwarder: swap MACs and send back out. */
int xdp_macswap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	unsigned char tmp[ETH_ALEN];

	if ((void *)(eth + 1) > data_end)
		return XDP_DROP;
	__builtin_memcpy(tmp, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, tmp, ETH_ALEN);
	return XDP_TX;
}
