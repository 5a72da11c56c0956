/* Live-frames traffic generator (BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES).
 * Live frames recycle their pages without re-initialising them, and receivers
 * may edit packets in place, so every frame is rewritten from a template; the
 * UDP source port then varies over GEN_FLOWS flows (the template's UDP
 * checksum is 0, so nothing else changes). */
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>

#define GEN_FRAME_LEN 60

struct frame_template {
	unsigned char bytes[64];
};

BPF_ARRAY(gen_template, struct frame_template, 1);
BPF_PERCPU_ARRAY(gen_sequence, u32, 1);

int xdp_generate(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	int zero = 0;
	struct frame_template *tpl = gen_template.lookup(&zero);
	u32 *seq = gen_sequence.lookup(&zero);

	if (data + GEN_FRAME_LEN > data_end || !tpl || !seq)
		return XDP_DROP;
	__builtin_memcpy(data, tpl->bytes, GEN_FRAME_LEN);
	struct udphdr *udp = data + sizeof(struct ethhdr) + sizeof(struct iphdr);

	*seq += 1;
	udp->source = bpf_htons(1024 + (*seq % GEN_FLOWS));
	return XDP_TX;
}
