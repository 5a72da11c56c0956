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

/* The memory floor of a connection table: one 64-byte line of a 64 MiB array
 * (1M lines, as a 1M-entry table of one-line entries) at a place hashed from
 * the flow (the source address's last word and the source port, the fields
 * bench/loop.c varies), read and dropped. Any table held in one large map pays
 * at least this for a flow whose line is not cached (bench/sidebyside.py times
 * it on the hit_100k frames). */
struct floor_line {
	__u64 w[8];
};

#define FLOOR_LINES (1 << 20)
BPF_ARRAY(floor_lines, struct floor_line, FLOOR_LINES);

int xdp_line64(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 l3 = sizeof(*eth), l4, src;

	if ((void *)(eth + 1) > data_end)
		return XDP_ABORTED;
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		src = 8 + 12;  /* the source's last word */
		l4 = l3 + 40;
	} else {
		src = 12;
		l4 = l3 + 20;
	}
	if (data + l4 + 4 > data_end)
		return XDP_ABORTED;
	__u64 h = *(__u32 *)(data + l3 + src);
	h = (h << 16) ^ *(__u16 *)(data + l4);
	h *= 0x9e3779b97f4a7c15ULL;
	h ^= h >> 29;
	__u32 i = (__u32)(((h >> 32) * FLOOR_LINES) >> 32);
	struct floor_line *line = floor_lines.lookup(&i);

	if (!line)
		return XDP_ABORTED;
	/* never true (the array stays zero): the read must not be optimised away */
	return line->w[0] == 0x5a5a5a5a5a5a5a5aULL ? XDP_PASS : XDP_DROP;
}
