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
 * pass. */
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
