/* The one-armed lab's two small programs (netns/onearm.py).
 *
 * xdp_router: an XDP "top-of-rack router". An IPv4 frame whose destination is
 * in router_routes gets that hop's MACs and leaves through its DEVMAP slot;
 * anything else goes on to the kernel (ARP, IPv6 neighbour discovery).
 *
 * tc_arrived: on a backend, at TC ingress, after its XDP program (lb's decap):
 * counts the IPv4 packets that reached the backend's stack, apart from those
 * still in an IPIP header (not decapsulated), then drops them, so the stack's
 * own work (a UDP socket lookup, an ICMP error) is not timed. Non-IPv4 frames
 * pass.
 *
 * xdp_hairpin_ipip: the cheapest one-armed tunnel LB, the ceiling the others
 * are compared with: every frame gets one fixed outer IPv4 header (one
 * backend, lengths and checksum precomputed for the generator's 60-byte
 * frames) and goes back out (XDP_TX). No parsing, no state, no choice. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>

struct hop {
	u32 slot; /* router_ports key */
	unsigned char dst[ETH_ALEN];
	unsigned char src[ETH_ALEN];
};

BPF_HASH(router_routes, __be32, struct hop, 64);
BPF_DEVMAP(router_ports, 64);

#define ARRIVED_PLAIN 0
#define ARRIVED_IPIP 1
BPF_PERCPU_ARRAY(arrived, u64, 2);

int xdp_router(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);

	if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	__be32 dst = ip->daddr;
	struct hop *hop = router_routes.lookup(&dst);

	if (!hop)
		return XDP_PASS;
	__builtin_memcpy(eth->h_dest, hop->dst, ETH_ALEN);
	__builtin_memcpy(eth->h_source, hop->src, ETH_ALEN);
	return router_ports.redirect_map(hop->slot, 0);
}

int tc_arrived(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);

	if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	int key = ip->protocol == IPPROTO_IPIP ? ARRIVED_IPIP : ARRIVED_PLAIN;
	u64 *count = arrived.lookup(&key);

	if (count)
		*count += 1;
	return TC_ACT_SHOT;
}

#define HAIRPIN_LEN 34 /* Ethernet + IPv4 headers (a number: bcc describes the map type to Python) */

struct hairpin {
	unsigned char bytes[HAIRPIN_LEN]; /* the new Ethernet header, then the outer IPv4 header */
};

BPF_ARRAY(hairpin_header, struct hairpin, 1);

int xdp_hairpin_ipip(struct xdp_md *ctx)
{
	int zero = 0;
	struct hairpin *h = hairpin_header.lookup(&zero);

	/* the new headers overwrite the old Ethernet header: the inner IP header stays where it is */
	if (!h || bpf_xdp_adjust_head(ctx, -(int)sizeof(struct iphdr)))
		return XDP_DROP;
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;

	if (data + HAIRPIN_LEN > data_end)
		return XDP_DROP;
	__builtin_memcpy(data, h->bytes, HAIRPIN_LEN);
	return XDP_TX;
}
