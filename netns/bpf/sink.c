/* Counting sink: count every IPv4 frame (per CPU), then drop it (or pass it).
 * Anything else (ARP above all) goes on to the kernel, so that neighbours stay
 * resolved while the sink swallows the traffic. */
#include <linux/if_ether.h>

BPF_PERCPU_ARRAY(sink_count, u64, 1);

int xdp_sink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	int zero = 0;
	u64 *count;

	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	count = sink_count.lookup(&zero);
	if (count)
		*count += 1;
	return SINK_ACTION;
}
