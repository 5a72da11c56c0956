/* lb data plane: XDP layer-4 load balancer, NAT mode.
 * The path of a packet, top-down: parse, VIP or reply?, pick a backend
 * (connection table, then Maglev), rewrite, send. Everything is counted. */
#include <uapi/linux/bpf.h>
#include "consts.h"
#include "structs.h"
#include "maps.h"
#include "parse.h"
#include "hash.h"
#include "nat.h"
#include "nexthop.h"

/* Count why, and tell a probe (lbctl test-packet) when it asks through the
 * packet's metadata; real traffic carries no metadata, so this costs one compare. */
static __always_inline int verdict(struct xdp_md *ctx, enum lb_reason reason, int action)
{
	__u32 key = reason;
	__u64 *count = reason_stats.lookup(&key);
	struct probe_meta *probe = (void *)(long)ctx->data_meta;

	if (count)
		*count += 1;
	if ((void *)(probe + 1) <= (void *)(long)ctx->data && probe->magic == LB_PROBE_MAGIC)
		probe->reason = reason;
	return action;
}

static __always_inline void count(struct lb_counters *c, __u32 len, int reply, int new_flow)
{
	if (!c)
		return;
	if (reply) {
		c->reply_packets += 1;
		c->reply_bytes += len;
	} else {
		c->packets += 1;
		c->bytes += len;
	}
	c->new_flows += new_flow;
}

static __always_inline void flow_key_of(struct flow_key *key, const struct packet *pkt)
{
	key->src = pkt->src;
	key->dst = pkt->dst;
	key->sport = pkt->sport;
	key->dport = pkt->dport;
	key->proto = pkt->proto;
}

static __always_inline int resolve_next_hop(struct xdp_md *ctx, const struct packet *pkt,
					    const union lb_addr *dst, struct next_hop *nh)
{
	struct route_key key = { .prefixlen = 128, .addr = *dst };
	struct next_hop *route = routes.lookup(&key);

	if (route && route->ifindex) {
		*nh = *route;
		return NH_FOUND;
	}
	return fib_next_hop(ctx, pkt, dst, nh);
}

/* XDP_TX back out of the ingress interface, XDP_REDIRECT through the DEVMAP
 * otherwise; -1 when the egress interface has no redirect slot. */
static __always_inline int transmit(struct xdp_md *ctx, struct packet *pkt, const struct next_hop *nh)
{
	write_macs(pkt, nh);
	if (nh->ifindex == ctx->ingress_ifindex)
		return XDP_TX;

	__u32 ifindex = nh->ifindex;
	__u32 *slot = if_slots.lookup(&ifindex);

	if (!slot)
		return -1;
	return tx_ports.redirect_map(*slot, 0);
}

/* Send a rewritten packet towards dst, caching the next hop in the flow. */
static __always_inline int forward(struct xdp_md *ctx, struct packet *pkt, struct flow_entry *flow,
				   const union lb_addr *dst, enum lb_reason ok)
{
	if (!flow->nh.ifindex) {
		int rc = resolve_next_hop(ctx, pkt, dst, &flow->nh);

		if (rc == NH_KERNEL)
			return verdict(ctx, LB_PASS_NEIGH_UNRESOLVED, XDP_PASS);
		if (rc == NH_NO_ROUTE)
			return verdict(ctx, LB_DROP_NO_ROUTE, XDP_DROP);
	}
	int action = transmit(ctx, pkt, &flow->nh);

	if (action < 0)
		return verdict(ctx, LB_PASS_EGRESS_UNMANAGED, XDP_PASS);
	return verdict(ctx, ok, action);
}

/* A new flow: pick a backend on the VIP's Maglev table, remember the choice
 * for both directions. */
static __always_inline struct flow_entry *new_flow(struct packet *pkt, struct flow_key *key,
						   const struct vip_info *vip, struct backend **be_out)
{
	__u32 slot = vip->id * LB_RING_SIZE + flow_hash(&pkt->src, &pkt->dst, pkt->sport, pkt->dport, pkt->proto) % LB_RING_SIZE;
	__u32 *backend_id = maglev.lookup(&slot);

	if (!backend_id || *backend_id == LB_NO_BACKEND)
		return NULL;
	struct backend *be = backends.lookup(backend_id);

	if (!be)
		return NULL;
	struct flow_entry entry = { .backend_id = *backend_id, .vip_id = vip->id };
	struct flow_key reply_key = {
		.src = be->addr, .dst = pkt->src, .sport = be->port, .dport = pkt->sport, .proto = pkt->proto,
	};

	conn_table.update(key, &entry);
	entry.flags = LB_FLOW_REPLY;
	conn_table.update(&reply_key, &entry);
	*be_out = be;
	return conn_table.lookup(key);
}

static __always_inline int to_backend(struct xdp_md *ctx, struct packet *pkt, const struct vip_info *vip)
{
	struct flow_key key = {};
	struct backend *be = NULL;
	int is_new = 0;

	flow_key_of(&key, pkt);
	struct flow_entry *flow = conn_table.lookup(&key);

	if (flow) {
		be = backends.lookup(&flow->backend_id);
	} else {
		flow = new_flow(pkt, &key, vip, &be);
		is_new = 1;
	}
	if (!flow || !be)
		return verdict(ctx, LB_DROP_NO_BACKEND, XDP_DROP);

	__u32 vip_id = vip->id, backend_id = flow->backend_id;

	count(vip_stats.lookup(&vip_id), pkt->len, 0, is_new);
	count(backend_stats.lookup(&backend_id), pkt->len, 0, is_new);
	nat_rewrite_destination(pkt, be);
	return forward(ctx, pkt, flow, &be->addr, LB_FWD_NAT);
}

static __always_inline int to_client(struct xdp_md *ctx, struct packet *pkt)
{
	struct flow_key key = {};

	flow_key_of(&key, pkt);
	struct flow_entry *flow = conn_table.lookup(&key);

	if (!flow || !(flow->flags & LB_FLOW_REPLY))
		return verdict(ctx, LB_PASS_NOT_VIP, XDP_PASS);
	__u32 vip_id = flow->vip_id, backend_id = flow->backend_id;
	struct vip_meta *vip = vip_meta.lookup(&vip_id);

	if (!vip || !(vip->flags & LB_VIP_ACTIVE))
		return verdict(ctx, LB_PASS_NOT_VIP, XDP_PASS);
	count(vip_stats.lookup(&vip_id), pkt->len, 1, 0);
	count(backend_stats.lookup(&backend_id), pkt->len, 1, 0);
	nat_rewrite_source(pkt, vip);
	return forward(ctx, pkt, flow, &pkt->dst, LB_FWD_REPLY);
}

int xdp_lb(struct xdp_md *ctx)
{
	struct packet pkt = {};
	int rc = parse_packet(ctx, &pkt);

	if (rc != LB_PARSE_OK)
		return verdict(ctx, rc, XDP_PASS);

	struct vip_key vkey = { .addr = pkt.dst, .port = pkt.dport, .proto = pkt.proto };
	struct vip_info *vip = vips.lookup(&vkey);

	if (vip)
		return to_backend(ctx, &pkt, vip);

	struct endpoint source = { .addr = pkt.src, .port = pkt.sport, .proto = pkt.proto };

	if (reply_sources.lookup(&source))
		return to_client(ctx, &pkt);
	return verdict(ctx, LB_PASS_NOT_VIP, XDP_PASS);
}
