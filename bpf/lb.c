/* lb data plane: XDP (or TC, see ctx.h) layer-4 load balancer; NAT, full NAT, DSR and tunnel modes per VIP.
 * The path of a packet, top-down: parse, VIP or reply?, pick a backend
 * (connection table, then Maglev), rewrite, send. Everything is counted. */
#include <uapi/linux/bpf.h>
#include "ctx.h"
#include "consts.h"
#include "structs.h"
#include "maps.h"
#include "parse.h"
#include "hash.h"
#include "nat.h"
#include "tunnel.h"
#include "nexthop.h"
#include "icmp.h"
#include "steer.h"
#include "conn.h"
#include "vlan.h"
#include "fullnat.h"

/* The control plane's switches and timeouts (bcc rewrites map calls in this file only). */
static __always_inline struct lb_config *config_of(void)
{
	__u32 zero = 0;

	return lb_config.lookup(&zero);
}

/* Count why, and tell a probe (lbctl test-packet) when it asks (ctx.h). */
static __always_inline int verdict(lb_ctx *ctx, enum lb_reason reason, int action)
{
	__u32 key = reason;
	__u64 *count = reason_stats.lookup(&key);

	if (count)
		*count += 1;
	lb_probe_report(ctx, reason);
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

/* A packet of a flow counts for its VIP and its backend alike. */
static __always_inline void count_flow(__u32 vip_id, __u32 backend_id, __u32 len, int reply, int new_flow)
{
	count(vip_stats.lookup(&vip_id), len, reply, new_flow);
	count(backend_stats.lookup(&backend_id), len, reply, new_flow);
}

static __always_inline void flow_key_of(struct flow_key *key, const struct packet *pkt)
{
	key->src = pkt->src;
	key->dst = pkt->dst;
	key->sport = pkt->sport;
	key->dport = pkt->dport;
	key->proto = pkt->proto;
}

static __always_inline int resolve_next_hop(lb_ctx *ctx, const struct packet *pkt,
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
 * otherwise, with the next hop's MACs; XDP_PASS, the frame untouched, when
 * the egress interface is not one of the LB's. (TC: bpf_redirect to any, the
 * client's VLAN tag removed first.) */
static __always_inline int transmit(lb_ctx *ctx, struct packet *pkt, const struct next_hop *nh)
{
#ifdef LB_HOOK_TC
	if ((frame_tagged(pkt) || ctx->vlan_present) && vlan_untag(ctx, pkt))
		return LB_ACT_DROP;
	write_macs(pkt, nh);
	if (nh->ifindex == ctx->ingress_ifindex)
		return LB_ACT_TX(ctx);
	return LB_ACT_REDIRECT(nh->ifindex);
#else
	if (nh->ifindex == ctx->ingress_ifindex) {
		write_macs(pkt, nh);
		return LB_ACT_TX(ctx);
	}
	int action = tx_ports.redirect_map(nh->ifindex, XDP_PASS);

	if (action == XDP_REDIRECT)
		write_macs(pkt, nh);
	return action;
#endif
}

/* The next hop is out of an interface lb is not attached to (XDP). A packet
 * addressed to its next hop (NAT, tunnel, a reply) goes to the kernel as it
 * arrived, to the LB's own MAC, and the kernel forwards it; a DSR packet,
 * still to the VIP, the kernel would not forward: it is sent straight out
 * with bpf_redirect (the device must take XDP frames: ndo_xdp_xmit). */
static __always_inline int unmanaged_egress(lb_ctx *ctx, struct packet *pkt, const struct next_hop *nh, int direct)
{
	if (!direct)
		return verdict(ctx, LB_PASS_EGRESS_UNMANAGED, LB_ACT_PASS);
#ifndef LB_HOOK_TC
	if (frame_tagged(pkt) && vlan_retag(ctx, pkt, NULL)) /* the client's tag is not the egress's */
		return verdict(ctx, LB_DROP_MALFORMED, LB_ACT_DROP);
#endif
	write_macs(pkt, nh);
	return verdict(ctx, LB_FWD_EGRESS_UNMANAGED, bpf_redirect(nh->ifindex, 0));
}

#ifndef LB_HOOK_TC
/* A tagged frame, or an egress lb is not attached to (it may be a VLAN
 * device): the frame leaves by the egress VLAN device's lower device with the
 * VLAN's tag, or by the egress itself untagged. A VLAN device on an interface
 * lb is not attached to gets the packet as it came, for the kernel. */
static __always_inline int send_vlan(lb_ctx *ctx, struct packet *pkt, const struct next_hop *nh,
				     enum lb_reason ok, int direct)
{
	__u32 ifindex = nh->ifindex;
	struct egress_vlan *vlan = egress_vlans.lookup(&ifindex);

	if (!vlan && !frame_tagged(pkt))
		return unmanaged_egress(ctx, pkt, nh, direct);
	__u32 out = vlan ? vlan->lower_ifindex : ifindex;
	int action = out == ctx->ingress_ifindex ? XDP_TX : tx_ports.redirect_map(out, XDP_PASS);

	if (action == XDP_PASS && vlan)
		return verdict(ctx, LB_PASS_VLAN_UNMANAGED, LB_ACT_PASS);
	if (action == XDP_PASS)
		return unmanaged_egress(ctx, pkt, nh, direct);
	if (vlan_retag(ctx, pkt, vlan))
		return verdict(ctx, LB_DROP_NO_HEADROOM, LB_ACT_DROP); /* no room for the tag */
	write_macs(pkt, nh);
	return verdict(ctx, ok, action);
}
#endif

static __always_inline __u32 current_nh_epoch(void)
{
	__u32 zero = 0;
	__u32 *epoch = nh_epoch.lookup(&zero);

	return epoch ? *epoch : 0;
}

/* *nh is a cache (a flow's or a backend's next hop): fill it when empty or
 * older than the last change of the kernel's routes and neighbours. */
static __always_inline int ensure_next_hop(lb_ctx *ctx, const struct packet *pkt,
					   const union lb_addr *dst, struct next_hop *nh)
{
	__u32 epoch = current_nh_epoch();

	if (nh->ifindex && nh->epoch == epoch)
		return NH_FOUND;
	int resolved = resolve_next_hop(ctx, pkt, dst, nh);

	if (resolved == NH_FOUND)
		nh->epoch = epoch;
	else
		nh->ifindex = 0; /* a stale copy must not pass for a fresh one */
	return resolved;
}

/* Send a rewritten packet by the outcome of its next-hop resolution;
 * `direct`: it is still addressed to the VIP (DSR). */
static __always_inline int send_to(lb_ctx *ctx, struct packet *pkt, const struct next_hop *nh,
				   int resolved, enum lb_reason ok, int direct)
{
	if (resolved == NH_KERNEL)
		return verdict(ctx, LB_PASS_NEIGH_UNRESOLVED, LB_ACT_PASS);
	if (resolved == NH_NO_ROUTE)
		return verdict(ctx, LB_DROP_NO_ROUTE, LB_ACT_DROP);

#ifdef LB_HOOK_TC
	int action = transmit(ctx, pkt, nh);

	if (action == LB_ACT_DROP) /* the client's tag could not be removed */
		return verdict(ctx, LB_DROP_NO_HEADROOM, LB_ACT_DROP);
	if (action == LB_ACT_PASS)
		return unmanaged_egress(ctx, pkt, nh, direct);
#else
	/* an untagged frame out of one of the LB's interfaces: transmit's way, nothing more */
	int action = frame_tagged(pkt) ? LB_ACT_PASS : transmit(ctx, pkt, nh);

	if (action == LB_ACT_PASS)
		return send_vlan(ctx, pkt, nh, ok, direct);
#endif
	return verdict(ctx, ok, action);
}

static __always_inline int send(lb_ctx *ctx, struct packet *pkt, const struct next_hop *nh,
				int resolved, enum lb_reason ok)
{
	return send_to(ctx, pkt, nh, resolved, ok, 0);
}

/* DSR's packet still names the VIP: the kernel, which would take it for its
 * own, cannot be left to resolve the backend's MAC (the control plane
 * solicits DSR backends' MACs instead). */
static __always_inline int send_direct(lb_ctx *ctx, struct packet *pkt, const struct next_hop *nh,
				       int resolved, enum lb_reason ok)
{
	if (resolved == NH_KERNEL)
		return verdict(ctx, LB_DROP_NEIGH_UNRESOLVED, LB_ACT_DROP);
	return send_to(ctx, pkt, nh, resolved, ok, 1);
}

/* Tunnel: the packet, untouched, inside an outer header to the backend (which
 * the kernel can forward itself while the backend's MAC is unresolved). */
static __always_inline int send_encapsulated(lb_ctx *ctx, struct packet *pkt, const struct backend *be,
					     const struct next_hop *nh, int resolved, enum lb_reason ok)
{
	if (tunnel_encap(ctx, pkt, be))
		return verdict(ctx, LB_DROP_NO_HEADROOM, LB_ACT_DROP);
	return send(ctx, pkt, nh, resolved, ok);
}

/* Send a client's packet on to its backend the VIP's way: NAT rewrites the
 * destination; DSR changes only the MACs (send writes them), so the backend,
 * which holds the VIP, answers the client itself; tunnel encapsulates. */
static __always_inline int forward(lb_ctx *ctx, struct packet *pkt, __u32 vip_flags,
				   const struct backend *be, const struct next_hop *nh, int resolved)
{
	if (vip_flags & LB_VIP_DSR)
		return send_direct(ctx, pkt, nh, resolved, LB_FWD_DSR);
	if (vip_flags & LB_VIP_TUNNEL)
		return send_encapsulated(ctx, pkt, be, nh, resolved, LB_FWD_TUNNEL);
	if (nat_rewrite_destination(ctx, pkt, be))
		return verdict(ctx, LB_DROP_MALFORMED, LB_ACT_DROP);
	return send(ctx, pkt, nh, resolved, LB_FWD_NAT);
}

/* The slot of a VIP's Maglev table a client's flow (client -> VIP) hashes to:
 * the table's size varies per VIP (a variable modulo, only on a new flow). */
static __always_inline __u32 maglev_slot(__u32 ring_base, __u32 ring_size, int by_source, const union lb_addr *client,
					 const union lb_addr *vip_addr, __be16 sport, __be16 dport, __u8 proto)
{
	union lb_addr none = {};
	__u32 hash = by_source ? flow_hash(client, &none, 0, 0, 0) : flow_hash(client, vip_addr, sport, dport, proto);

	return ring_base + hash % ring_size;
}

/* Does this packet open the flow's entry? An RST opens nothing. A SYN is
 * forwarded by the hash alone, and the handshake's next packet opens the
 * entry, so spoofed SYNs never occupy the table (its SYN-ACK finds the VIP by
 * the same hash, see handshake_reply) -- except to an endpoint shared by
 * several VIPs, whose SYN-ACK could not tell which VIP the SYN was for. */
static __always_inline int opens_entry(const struct packet *pkt, const struct backend *be)
{
	if (is_rst(pkt))
		return 0;
	return !is_syn(pkt) || (be->flags & LB_BACKEND_SHARED);
}

/* A SYN to an endpoint shared by several VIPs starts the client's tuple over
 * there: the entries of the same client port towards the endpoint's other
 * VIPs (a closed connection's, kept until they idle out) would otherwise take
 * this connection's replies, since reply_flow tries the VIPs in turn. */
static __always_inline void start_over_at_shared_endpoint(const struct packet *pkt, const struct backend *be,
							  __u32 vip_id)
{
	if (!(be->flags & LB_BACKEND_SHARED) || !is_syn(pkt))
		return;
	__be16 port = be->port ? be->port : pkt->dport; /* where the backend answers from */
	struct endpoint ep = { .addr = be->addr, .port = port, .proto = pkt->proto };
	struct reply_source *rs = reply_sources.lookup(&ep);

	if (!rs) {
		ep.port = 0; /* a backend of VIPs of every port */
		rs = reply_sources.lookup(&ep);
		if (!rs)
			return;
	}
	for (int i = 0; i < LB_REPLY_VIPS; i++) {
		if (i >= rs->count)
			break;
		__u32 other = rs->vip_ids[i];
		struct vip_meta *vip = vip_meta.lookup(&other);

		if (other == vip_id || !vip)
			continue;
		struct flow_key key = {
			.src = pkt->src, .dst = vip->addr, .sport = pkt->sport, .dport = vip->port ? vip->port : port,
			.proto = pkt->proto,
		};
		conn_table.delete(&key);
	}
}

/* A new flow: pick a backend on the VIP's Maglev table and remember the choice. */
static __always_inline int new_flow(lb_ctx *ctx, struct packet *pkt, struct flow_key *key,
				    const struct vip_info *vip, __u32 now)
{
	__u32 slot = maglev_slot(vip->ring_base, vip->ring_size, vip->flags & LB_VIP_HASH_SOURCE, &pkt->src, &pkt->dst,
				 pkt->sport, pkt->dport, pkt->proto);
	__u32 *picked = maglev.lookup(&slot);

	if (!picked || *picked == LB_NO_BACKEND)
		return verdict(ctx, LB_DROP_NO_BACKEND, LB_ACT_DROP);
	__u32 backend_id = *picked, vip_id = vip->id;
	struct backend *be = backends.lookup(&backend_id);
	struct next_hop *be_nh = backend_nh.lookup(&backend_id);

	if (!be || !be_nh)
		return verdict(ctx, LB_DROP_NO_BACKEND, LB_ACT_DROP);
	int resolved = ensure_next_hop(ctx, pkt, &be->addr, be_nh);
	struct flow_entry entry = {
		.backend_id = backend_id, .vip_id = vip_id, .generation = be->generation, .last_seen = now,
		.flags = is_closing(pkt) ? LB_FLOW_CLOSING : 0,
	};

	if (opens_entry(pkt, be)) {
		start_over_at_shared_endpoint(pkt, be, vip_id);
		conn_table.update(key, &entry);
	}
	/* a connection counts once, at its SYN (the entry of its next packet is not another) */
	count_flow(vip_id, backend_id, pkt->len, 0, pkt->proto != IPPROTO_TCP || is_syn(pkt));
	return forward(ctx, pkt, vip->flags, be, be_nh, resolved);
}

static __always_inline struct vip_meta *active_vip(__u32 vip_id)
{
	struct vip_meta *vip = vip_meta.lookup(&vip_id);

	if (!vip || !(vip->flags & LB_VIP_ACTIVE))
		return NULL;
	/* keep the branch: a compiler that turns the test into a mask of the pointer gets it refused */
	asm volatile("" : "+r"(vip));
	return vip;
}

/* --- Full NAT (fullnat.h) --------------------------------------------------- */


static __always_inline struct fullnat_scratch *scratch(void)
{
	__u32 zero = 0;

	return fullnat_scratch.lookup(&zero);
}

/* May a new flow take this port over from its owner? Yes when the owner is
 * the flow itself (picking again), and when the owner's flow is over: its
 * VIP gone, its entry gone (evicted), holding another port or backend, or
 * idle past its timeout. */
static __always_inline int snat_port_reclaimable(struct fullnat_scratch *s, const struct fullnat_owner *owner,
						 const struct lb_config *config, __u32 now)
{
	const struct fullnat_owner *mine = &s->owner;
	const struct flow_key *rkey = &s->rkey;

	if (owner->vip_id == mine->vip_id && owner->client_port == mine->client_port &&
	    owner->vip_port == mine->vip_port && addr_equal(&owner->client, &mine->client))
		return 1;
	struct vip_meta *vip = active_vip(owner->vip_id);

	if (!vip)
		return 1;
	fullnat_client_key(&s->key, owner, &vip->addr, rkey->proto);
	struct fullnat_flow *f = fullnat_flows.lookup(&s->key);

	if (!f || !fullnat_holds(f, &rkey->dst, rkey->dport))
		return 1;
	__u32 backend_id = f->flow.backend_id;
	struct backend *be = backends.lookup(&backend_id);

	if (!be || !addr_equal(&be->addr, &rkey->src) || be->generation != f->flow.generation)
		return 1;
	return now - f->flow.last_seen > idle_timeout(config, &f->flow, rkey->proto);
}

/* Take a source (address, port) for a new flow to this backend: the first
 * probed slot whose reverse entry this flow can insert (fullnat.h), into
 * s->flow. Returns 0, or -1 when the probed slots are all busy. */
static __always_inline int snat_allocate(struct fullnat_scratch *s, const struct packet *pkt,
					 const struct backend *be, __u32 vip_id, const struct lb_config *config, __u32 now)
{
	struct snat_pool *pool = snat_pools.lookup(&vip_id);

	if (!pool)
		return -1;
	s->owner.client = pkt->src;
	s->owner.client_port = pkt->sport;
	s->owner.vip_port = pkt->dport;
	s->owner.vip_id = vip_id;
	__builtin_memset(&s->rkey, 0, sizeof(s->rkey));
	s->rkey.src = be->addr;
	s->rkey.sport = be->port ? be->port : pkt->dport;
	s->rkey.proto = pkt->proto;
	__u32 h = flow_hash(&pkt->src, &pkt->dst, pkt->sport, pkt->dport, pkt->proto);

	for (__u32 i = 0; i < LB_SNAT_PROBES; i++) {
		__u32 a = 0;

		if (snat_slot(pool, h, i, &a, &s->rkey.dport))
			return -1;
		s->rkey.dst = pool->addrs[a];
		if (fullnat_ports.insert(&s->rkey, &s->owner) == 0)
			goto taken;
		struct fullnat_owner *owner = fullnat_ports.lookup(&s->rkey);

		/* delete, then insert only where none is: of two CPUs taking the same stale port over, one wins */
		if (owner && snat_port_reclaimable(s, owner, config, now)) {
			fullnat_ports.delete(&s->rkey);
			if (fullnat_ports.insert(&s->rkey, &s->owner) == 0)
				goto taken;
		}
	}
	return -1;
taken:
	s->flow.snat_addr = s->rkey.dst;
	s->flow.snat_port = s->rkey.dport;
	return 0;
}

/* A new full-NAT flow: its backend as new_flow picks it, a source port, both
 * entries. Every packet opens one, a SYN too: the SYN-ACK must find its port.
 * Returns the next hop's resolution, with the backend and the entry, or minus
 * the reason of a drop. */
static __always_inline int fullnat_new_flow(lb_ctx *ctx, struct packet *pkt, struct flow_key *key,
					    const struct vip_info *vip, const struct lb_config *config, __u32 now,
					    struct backend **be_out, struct next_hop **nh_out, struct fullnat_flow **f_out)
{
	__u32 slot = maglev_slot(vip->ring_base, vip->ring_size, vip->flags & LB_VIP_HASH_SOURCE, &pkt->src, &pkt->dst,
				 pkt->sport, pkt->dport, pkt->proto);
	__u32 *picked = maglev.lookup(&slot);

	if (!picked || *picked == LB_NO_BACKEND)
		return -LB_DROP_NO_BACKEND;
	__u32 backend_id = *picked, vip_id = vip->id;
	struct backend *be = backends.lookup(&backend_id);
	struct next_hop *be_nh = backend_nh.lookup(&backend_id);
	struct fullnat_scratch *s = scratch();

	if (!be || !be_nh || !s)
		return -LB_DROP_NO_BACKEND;
	struct fullnat_flow *f = &s->flow;

	__builtin_memset(f, 0, sizeof(*f));
	f->flow.backend_id = backend_id;
	f->flow.vip_id = vip_id;
	f->flow.generation = be->generation;
	f->flow.last_seen = now;
	f->flow.flags = is_closing(pkt) ? LB_FLOW_CLOSING : 0;
	if (snat_allocate(s, pkt, be, vip_id, config, now))
		return -LB_DROP_SNAT_EXHAUSTED;
	int resolved = ensure_next_hop(ctx, pkt, &be->addr, be_nh);

	fullnat_flows.update(key, f);
	count_flow(vip_id, backend_id, pkt->len, 0, pkt->proto != IPPROTO_TCP || is_syn(pkt));
	*be_out = be;
	*nh_out = be_nh;
	*f_out = f;
	return resolved;
}

/* A client's packet to a full-NAT VIP: its flow's entry while true (conn.h), a new flow otherwise. */
static __always_inline int fullnat_to_backend(lb_ctx *ctx, struct packet *pkt, const struct vip_info *vip)
{
	struct flow_key key = {};

	flow_key_of(&key, pkt);
	struct fullnat_flow *f = fullnat_flows.lookup(&key);
	struct lb_config *config = config_of();
	__u32 now = lb_clock(config);

	struct backend *be = NULL;
	struct next_hop *be_nh = NULL; /* the backend's own (backend_nh), as a NAT flow's */
	int resolved;

	if (f) {
		__u32 backend_id = f->flow.backend_id;

		be = backends.lookup(&backend_id);
		be_nh = backend_nh.lookup(&backend_id);
		if (be && be_nh && flow_trusted(&f->flow, be, vip->id, pkt, config, now)) {
			flow_touch(&f->flow, pkt, now);
			count_flow(vip->id, backend_id, pkt->len, 0, 0);
		} else {
			f = NULL;
		}
	}
	if (f) {
		resolved = ensure_next_hop(ctx, pkt, &be->addr, be_nh);
	} else {
		resolved = fullnat_new_flow(ctx, pkt, &key, vip, config, now, &be, &be_nh, &f);
		if (resolved < 0)
			return verdict(ctx, -resolved, LB_ACT_DROP);
	}
	if (!be || !be_nh || !f)
		return verdict(ctx, LB_DROP_NO_BACKEND, LB_ACT_DROP);
	/* one rewrite and one send for both ways in: the TC build's checksum helpers cost the verifier */
	if (fullnat_rewrite_to_backend(ctx, pkt, be, &f->snat_addr, f->snat_port))
		return verdict(ctx, LB_DROP_MALFORMED, LB_ACT_DROP);
	/* From an address of this host: the kernel would drop it as a martian, so it is never left to
	 * the kernel to forward (the control plane keeps full-NAT backends' MACs resolved, as DSR's). */
	return send_direct(ctx, pkt, be_nh, resolved, LB_FWD_FULLNAT);
}

/* A backend's packet to a source address and port of the pool: the reply of
 * the flow that owns the port, if that flow's entry still holds the port and
 * names this very backend; dropped otherwise (it must not leave un-NATed). */
static __always_inline int fullnat_to_client(lb_ctx *ctx, struct packet *pkt, const struct fullnat_owner *found,
					     struct fullnat_scratch *s)
{
	struct fullnat_owner *owner = &s->owner;

	*owner = *found;
	struct vip_meta *vip = active_vip(owner->vip_id);

	if (!vip)
		return verdict(ctx, LB_DROP_REPLY_NO_FLOW, LB_ACT_DROP);
	fullnat_client_key(&s->key, owner, &vip->addr, pkt->proto);
	struct fullnat_flow *f = fullnat_flows.lookup(&s->key);

	if (!f || !fullnat_holds(f, &pkt->dst, pkt->dport) || f->flow.vip_id != owner->vip_id)
		return verdict(ctx, LB_DROP_REPLY_NO_FLOW, LB_ACT_DROP);
	__u32 backend_id = f->flow.backend_id;
	struct backend *be = backends.lookup(&backend_id);

	if (!be || be->generation != f->flow.generation || !addr_equal(&be->addr, &pkt->src))
		return verdict(ctx, LB_DROP_REPLY_NO_FLOW, LB_ACT_DROP);
	s->rkey.src = vip->addr; /* the VIP's address, kept while the packet changes */

	flow_touch(&f->flow, pkt, lb_clock(config_of()));
	count_flow(owner->vip_id, backend_id, pkt->len, 1, 0);
	if (fullnat_rewrite_to_client(ctx, pkt, owner, &s->rkey.src))
		return verdict(ctx, LB_DROP_MALFORMED, LB_ACT_DROP);
	/* (pkt's addresses are those it arrived with: the client is the owner's) */
	return send(ctx, pkt, &f->flow.reply_nh, ensure_next_hop(ctx, pkt, &owner->client, &f->flow.reply_nh),
		    LB_FWD_FULLNAT_REPLY);
}

/* Is the packet a reply to a full-NAT source address and port? Its tuple names
 * the port's owner. Returns 1 with the action in *action if so, 0 if not. */
static __always_inline int fullnat_reply(lb_ctx *ctx, struct packet *pkt, int *action)
{
	struct fullnat_scratch *s = scratch();

	if (!s)
		return 0;
	flow_key_of(&s->key, pkt);
	struct fullnat_owner *owner = fullnat_ports.lookup(&s->key);

	if (!owner)
		return 0;
	*action = fullnat_to_client(ctx, pkt, owner, s);
	return 1;
}

/* The VIP's source rules: the longest matching prefix decides; without a
 * match, a VIP with allow rules denies and one with deny rules only allows. */
static __always_inline int source_allowed(const struct packet *pkt, const struct vip_info *vip)
{
	if (!(vip->flags & LB_VIP_ACL))
		return 1;
	struct acl_key key = { .prefixlen = 32 + 128, .vip_id = vip->id, .addr = pkt->src };
	struct acl_rule *rule = acl.lookup(&key);

	if (rule)
		return rule->action == LB_ACL_ALLOW;
	return !(vip->flags & LB_VIP_ACL_ALLOWLIST);
}

/* The VIP of the packet's address, port and protocol by its slot (no hash lookup),
 * if the slot's VIP record names exactly those. */
static __always_inline int slot_vip(const struct packet *pkt, struct vip_info *vip)
{
	__u32 slot = vip_slot(&pkt->dst, pkt->dport, pkt->proto);
	__u32 *held = vip_slots.lookup(&slot);

	if (!held || !*held)
		return 0;
	__u32 vip_id = *held - 1;
	struct vip_meta *meta = vip_meta.lookup(&vip_id);

	if (!meta || !(meta->flags & LB_VIP_ACTIVE) || meta->port != pkt->dport || meta->proto != pkt->proto ||
	    meta->addr.w[0] != pkt->dst.w[0] || meta->addr.w[1] != pkt->dst.w[1] || meta->addr.w[2] != pkt->dst.w[2] ||
	    meta->addr.w[3] != pkt->dst.w[3])
		return 0;
	vip->id = vip_id;
	vip->flags = meta->info_flags;
	vip->ring_base = meta->ring_base;
	vip->ring_size = meta->ring_size;
	return 1;
}

/* The VIP of the packet: of its address, port and protocol, else of its address's every port. */
static __always_inline int vip_of(const struct packet *pkt, int any_port, struct vip_info *vip)
{
	if (slot_vip(pkt, vip))
		return 1;
	struct vip_key key = { .addr = pkt->dst, .port = pkt->dport, .proto = pkt->proto };
	struct vip_info *found = vips.lookup(&key);

	if (!found && any_port) {
		key.port = 0;
		found = vips.lookup(&key);
	}
	if (!found)
		return 0;
	*vip = *found;
	return 1;
}

static __always_inline int to_backend(lb_ctx *ctx, struct packet *pkt, const struct vip_info *vip)
{
	struct flow_key key = {};

	if (!source_allowed(pkt, vip))
		return verdict(ctx, LB_DROP_ACL, LB_ACT_DROP);
	if (vip->flags & LB_VIP_FULLNAT)
		return fullnat_to_backend(ctx, pkt, vip);

	flow_key_of(&key, pkt);
	struct flow_entry *flow = conn_table.lookup(&key);
	struct lb_config *config = config_of();
	__u32 now = lb_clock(config);

	if (!flow)
		return new_flow(ctx, pkt, &key, vip, now);

	__u32 vip_id = vip->id, backend_id = flow->backend_id;
	struct backend *be = backends.lookup(&backend_id);
	struct next_hop *be_nh = backend_nh.lookup(&backend_id);

	if (!be || !be_nh || !flow_trusted(flow, be, vip_id, pkt, config, now))
		return new_flow(ctx, pkt, &key, vip, now);
	start_over_at_shared_endpoint(pkt, be, vip_id);
	flow_touch(flow, pkt, now);
	count_flow(vip_id, backend_id, pkt->len, 0, 0);
	int resolved = ensure_next_hop(ctx, pkt, &be->addr, be_nh);

	return forward(ctx, pkt, vip->flags, be, be_nh, resolved);
}

/* Is the packet's source this backend? (port 0: the backend keeps the client's port) */
static __always_inline int same_endpoint(const struct backend *be, const struct packet *pkt)
{
	return (be->port == pkt->sport || !be->port) && be->addr.w[0] == pkt->src.w[0] &&
	       be->addr.w[1] == pkt->src.w[1] && be->addr.w[2] == pkt->src.w[2] && be->addr.w[3] == pkt->src.w[3];
}

/* The flow a backend's reply belongs to among one VIP's: the client's own
 * flow (found by its tuple towards that VIP), and only if its entry is still
 * true, names this very backend and may answer this reply (flow_answers_reply). */
static __always_inline struct flow_entry *vip_reply_flow(const struct packet *pkt, __u32 vip_id,
							 struct vip_meta **vip_out)
{
	struct vip_meta *vip = active_vip(vip_id);

	if (!vip)
		return NULL;
	/* A VIP that takes every port kept the client's destination port. */
	struct flow_key key = {
		.src = pkt->dst, .dst = vip->addr, .sport = pkt->dport, .dport = vip->port ? vip->port : pkt->sport,
		.proto = pkt->proto,
	};
	struct flow_entry *flow = conn_table.lookup(&key);

	if (!flow)
		return NULL;
	__u32 backend_id = flow->backend_id;
	struct backend *be = backends.lookup(&backend_id);

	if (!be || !same_endpoint(be, pkt) || be->generation != flow->generation || be->vip_id != vip_id ||
	    flow->vip_id != vip_id)
		return NULL;
	struct lb_config *config = config_of();

	if (!flow_answers_reply(flow, pkt, config, lb_clock(config)))
		return NULL;
	*vip_out = vip;
	return flow;
}

/* The VIPs the endpoint serves, in turn (usually one: an endpoint shared by
 * several VIPs costs a lookup more per VIP, and no entry at all). */
static __always_inline struct flow_entry *reply_flow(const struct packet *pkt, const struct reply_source *rs,
						     struct vip_meta **vip)
{
	for (int i = 0; i < LB_REPLY_VIPS; i++) {
		if (i >= rs->count)
			break;
		struct flow_entry *flow = vip_reply_flow(pkt, rs->vip_ids[i], vip);

		if (flow)
			return flow;
	}
	return NULL;
}

/* A SYN-ACK of a connection whose SYN opened no entry (opens_entry): its
 * backend, if the one VIP the endpoint serves has its Maglev table send the
 * client's flow to this very backend; LB_NO_BACKEND otherwise. */
static __always_inline __u32 handshake_backend(const struct packet *pkt, const struct reply_source *rs,
					       struct vip_meta **vip_out, __u32 *vip_id_out)
{
	if (rs->count != 1 || pkt->proto != IPPROTO_TCP ||
	    (pkt->tcp_flags & (LB_TCP_SYN | LB_TCP_ACK)) != (LB_TCP_SYN | LB_TCP_ACK))
		return LB_NO_BACKEND;
	__u32 vip_id = rs->vip_ids[0];
	struct vip_meta *vip = active_vip(vip_id);

	if (!vip)
		return LB_NO_BACKEND;
	__u32 slot = maglev_slot(vip->ring_base, vip->ring_size, vip->flags & LB_VIP_META_HASH_SOURCE, &pkt->dst,
				 &vip->addr, pkt->dport, vip->port ? vip->port : pkt->sport, pkt->proto);
	__u32 *picked = maglev.lookup(&slot);

	if (!picked)
		return LB_NO_BACKEND;
	__u32 backend_id = *picked;
	struct backend *be = backends.lookup(&backend_id);

	if (!be || !same_endpoint(be, pkt) || be->vip_id != vip_id)
		return LB_NO_BACKEND;
	*vip_out = vip;
	*vip_id_out = vip_id;
	return backend_id;
}

/* Its reply leaves as from the VIP, by the route (no entry caches a next hop). */
static __always_inline int handshake_reply(lb_ctx *ctx, struct packet *pkt, const struct vip_meta *vip,
					   __u32 vip_id, __u32 backend_id)
{
	struct next_hop nh = {};
	int resolved = resolve_next_hop(ctx, pkt, &pkt->dst, &nh);

	count_flow(vip_id, backend_id, pkt->len, 1, 0);
	if (nat_rewrite_source(ctx, pkt, vip))
		return verdict(ctx, LB_DROP_MALFORMED, LB_ACT_DROP);
	return send(ctx, pkt, &nh, resolved, LB_FWD_REPLY);
}

/* Would the kernel forward this packet (rather than take it for the LB host
 * itself: a health check's answer)? */
static __always_inline int would_forward(lb_ctx *ctx, const struct packet *pkt)
{
	struct next_hop scratch = {};

	return fib_next_hop(ctx, pkt, &pkt->dst, &scratch) != NH_NO_ROUTE;
}

static __always_inline int to_client(lb_ctx *ctx, struct packet *pkt, struct flow_entry *flow,
				     const struct vip_meta *vip)
{
	__u32 vip_id = flow->vip_id, backend_id = flow->backend_id;

	flow_touch(flow, pkt, lb_clock(config_of()));
	count_flow(vip_id, backend_id, pkt->len, 1, 0);
	if (nat_rewrite_source(ctx, pkt, vip))
		return verdict(ctx, LB_DROP_MALFORMED, LB_ACT_DROP);
	if (flow->flags & LB_FLOW_LOCAL) /* the LB host's own connection (steered at TC egress) */
		return verdict(ctx, LB_PASS_LOCAL_REPLY, LB_ACT_PASS);
	return send(ctx, pkt, &flow->reply_nh, ensure_next_hop(ctx, pkt, &pkt->dst, &flow->reply_nh), LB_FWD_REPLY);
}

/* What the address filter knows of an address's bucket: LB_FILTER_* bits, 0 when nothing. */
static __always_inline __u32 addr_filter_of(const union lb_addr *addr)
{
	__u32 bucket = addr_bucket(addr);
	__u32 *known = addr_filter.lookup(&bucket);

	return known ? *known : 0;
}

static __always_inline int is_vip_address(const union lb_addr *addr)
{
	return vip_addrs.lookup((union lb_addr *)addr) != NULL;
}

/* To a VIP's address, but for no VIP of it: dropped (the host would answer
 * with its own services, or forward it along a health check's route), unless
 * the operator passes that address's unserved traffic to the host. */
static __always_inline int unserved(lb_ctx *ctx, const struct packet *pkt, enum lb_reason drop)
{
	struct vip_addr *addr = vip_addrs.lookup((union lb_addr *)&pkt->dst);

	if (!addr)
		return verdict(ctx, LB_PASS_NOT_VIP, LB_ACT_PASS);
	if (addr->flags & LB_ADDR_PASS_UNSERVED)
		return verdict(ctx, LB_PASS_UNSERVED, LB_ACT_PASS);
	return verdict(ctx, drop, LB_ACT_DROP);
}

/* What the program cannot balance it drops when it was meant for a VIP, and
 * passes to the kernel otherwise. */
static __always_inline int unbalanceable(lb_ctx *ctx, const struct packet *pkt, int reason)
{
	if (!pkt->ip_version || !is_vip_address(&pkt->dst))
		return verdict(ctx, reason, LB_ACT_PASS);
	switch (reason) {
	case LB_PASS_V4_MAPPED:
		return verdict(ctx, LB_DROP_V4_MAPPED, LB_ACT_DROP);
	case LB_PASS_UNSUPPORTED_L4: /* no VIP serves another protocol */
		return unserved(ctx, pkt, LB_DROP_UNSUPPORTED_L4);
	case LB_PASS_IP_OPTIONS:
		return verdict(ctx, LB_DROP_IP_OPTIONS, LB_ACT_DROP);
	case LB_PASS_FRAGMENT:
		return verdict(ctx, LB_DROP_FRAGMENT, LB_ACT_DROP);
	default:
		return verdict(ctx, LB_DROP_MALFORMED, LB_ACT_DROP);
	}
}

/* An ICMP error quoting a reply of the flow goes where the flow goes, the
 * VIP's way: NAT rewrites it for the backend (outer destination, quoted
 * source); DSR and tunnel backends hold the VIP and get it as it came, to
 * their MAC or encapsulated. The next hop is resolved before the packet grows. */
static __always_inline int forward_icmp_error(lb_ctx *ctx, struct packet *pkt, struct icmp_inner *in,
					      const struct backend *be, struct next_hop *nh, __u8 mode)
{
	int resolved = ensure_next_hop(ctx, pkt, &be->addr, nh);

	if (mode == LB_MODE_DSR)
		return send_direct(ctx, pkt, nh, resolved, LB_FWD_ICMP_ERROR);
	if (mode == LB_MODE_TUNNEL)
		return send_encapsulated(ctx, pkt, be, nh, resolved, LB_FWD_ICMP_ERROR);
	if (icmp_error_rewrite_to_backend(ctx, pkt, in, be))
		return verdict(ctx, LB_DROP_MALFORMED, LB_ACT_DROP);
	return send(ctx, pkt, nh, resolved, LB_FWD_ICMP_ERROR);
}

/* Does the quoted packet come from this VIP? (port 0: the VIP takes every port) */
static __always_inline int quote_from_vip(const struct icmp_inner *in, const struct vip_meta *vip)
{
	return (vip->port == in->ports[0] || !vip->port) && vip->addr.w[0] == in->src.w[0] &&
	       vip->addr.w[1] == in->src.w[1] && vip->addr.w[2] == in->src.w[2] && vip->addr.w[3] == in->src.w[3];
}

static __always_inline int fullnat_configured(void)
{
	struct lb_config *config = config_of();

	return config && (config->flags & LB_CFG_FULLNAT);
}

/* "Too big" about a full-NAT flow's reply, which left as VIP -> client: to the
 * backend, about the packet it sent (backend -> the flow's source address and
 * port), from that source address. Returns 1 with the action in *action when
 * the quote is a full-NAT flow's, 0 otherwise. */
static __always_inline int fullnat_icmp_to_backend(lb_ctx *ctx, struct packet *pkt, struct icmp_inner *in,
						   struct flow_key *key, int *action)
{
	struct fullnat_flow *f = fullnat_flows.lookup(key);
	struct fullnat_scratch *s = scratch();

	if (!f || !s)
		return 0;
	struct vip_meta *vip = active_vip(f->flow.vip_id);
	__u32 backend_id = f->flow.backend_id;
	struct backend *be = backends.lookup(&backend_id);
	struct next_hop *be_nh = backend_nh.lookup(&backend_id);

	if (!vip || !quote_from_vip(in, vip) || !be || !be_nh || be->generation != f->flow.generation ||
	    be->vip_id != f->flow.vip_id) {
		*action = verdict(ctx, LB_DROP_ICMP_NO_FLOW, LB_ACT_DROP);
		return 1;
	}
	struct fullnat_icmp *to = &s->icmp;

	to->outer_src = f->snat_addr;
	to->outer_dst = be->addr;
	to->quote_src = be->addr;
	to->quote_sport = be->port ? be->port : in->ports[0];
	to->quote_dst = f->snat_addr;
	to->quote_dport = f->snat_port;
	int resolved = ensure_next_hop(ctx, pkt, &be->addr, be_nh);

	if (fullnat_icmp_rewrite(ctx, pkt, in, to))
		*action = verdict(ctx, LB_DROP_MALFORMED, LB_ACT_DROP);
	else
		*action = send_direct(ctx, pkt, be_nh, resolved, LB_FWD_ICMP_ERROR);
	return 1;
}

/* An ICMP error from a backend's side about a packet the LB sent it from a
 * full-NAT source address and port (the quote): to the client that owns the
 * port, about its own packet (client -> VIP), from the VIP. Returns 1 with the
 * action in *action when the quote names a full-NAT port, 0 otherwise. */
static __always_inline int fullnat_icmp_to_client(lb_ctx *ctx, struct packet *pkt, struct icmp_inner *quote,
						  int *action)
{
	struct fullnat_scratch *s = scratch();

	if (!s || icmp_parse_inner(pkt, (void *)(long)ctx->data_end, quote) != LB_PARSE_OK)
		return 0;
	if (pkt->ip_version == 6 && (addr_is_v4_mapped(&quote->src) || addr_is_v4_mapped(&quote->dst)))
		return 0;
	__builtin_memset(&s->key, 0, sizeof(s->key));
	s->key.src = quote->dst;
	s->key.dst = quote->src;
	s->key.sport = quote->ports[1];
	s->key.dport = quote->ports[0];
	s->key.proto = quote->proto;
	struct fullnat_owner *found = fullnat_ports.lookup(&s->key);

	if (!found)
		return 0;
	struct fullnat_owner *owner = &s->owner;

	*owner = *found;
	struct vip_meta *vip = active_vip(owner->vip_id);

	if (!vip) {
		*action = verdict(ctx, LB_DROP_ICMP_NO_FLOW, LB_ACT_DROP);
		return 1;
	}
	fullnat_client_key(&s->key, owner, &vip->addr, quote->proto);
	struct fullnat_flow *f = fullnat_flows.lookup(&s->key);

	if (!f || !fullnat_holds(f, &quote->src, quote->ports[0]) || f->flow.vip_id != owner->vip_id) {
		*action = verdict(ctx, LB_DROP_ICMP_NO_FLOW, LB_ACT_DROP);
		return 1;
	}
	struct fullnat_icmp *to = &s->icmp;

	to->outer_src = vip->addr;
	to->outer_dst = owner->client;
	to->quote_src = owner->client;
	to->quote_sport = owner->client_port;
	to->quote_dst = vip->addr;
	to->quote_dport = owner->vip_port;
	if (fullnat_icmp_rewrite(ctx, pkt, quote, to)) {
		*action = verdict(ctx, LB_DROP_MALFORMED, LB_ACT_DROP);
		return 1;
	}
	*action = send(ctx, pkt, &f->flow.reply_nh, ensure_next_hop(ctx, pkt, &owner->client, &f->flow.reply_nh),
		       LB_FWD_ICMP_ERROR);
	return 1;
}

/* "Fragmentation needed" / "packet too big" about a reply that left as
 * VIP -> client: reversed, the quote is the client's flow, which names the
 * backend that sent the reply and must lower its path MTU. */
static __always_inline int icmp_error_to_backend(lb_ctx *ctx, struct packet *pkt, struct icmp_inner *in)
{
	int rc = icmp_parse_inner(pkt, (void *)(long)ctx->data_end, in);

	if (rc != LB_PARSE_OK)
		return unbalanceable(ctx, pkt, rc);
	if (pkt->ip_version == 6 && (addr_is_v4_mapped(&in->src) || addr_is_v4_mapped(&in->dst)))
		return verdict(ctx, LB_DROP_V4_MAPPED, LB_ACT_DROP); /* it would name an IPv4 flow */
	struct flow_key key = {
		.src = in->dst, .dst = in->src, .sport = in->ports[1], .dport = in->ports[0], .proto = in->proto,
	};
	struct flow_entry *flow = conn_table.lookup(&key);
	int action = 0;

	if (!flow && fullnat_configured() && fullnat_icmp_to_backend(ctx, pkt, in, &key, &action))
		return action;
	if (!flow)
		return unserved(ctx, pkt, LB_DROP_ICMP_NO_FLOW); /* maybe about the host's own connection */
	struct vip_meta *vip = active_vip(flow->vip_id);

	if (!vip || !quote_from_vip(in, vip))
		return unserved(ctx, pkt, LB_DROP_ICMP_NO_FLOW);
	__u32 backend_id = flow->backend_id;
	struct backend *be = backends.lookup(&backend_id);
	struct next_hop *be_nh = backend_nh.lookup(&backend_id);

	if (!be || !be_nh || be->generation != flow->generation || be->vip_id != flow->vip_id)
		return verdict(ctx, LB_DROP_ICMP_NO_FLOW, LB_ACT_DROP);
	return forward_icmp_error(ctx, pkt, in, be, be_nh, vip->mode);
}

static __always_inline int handle_icmp(lb_ctx *ctx, struct packet *pkt)
{
	struct icmp_inner quote = {}; /* one for both ways: the stack is short */
	int action = 0;

	if (icmp_is_neighbour_discovery(pkt))
		return verdict(ctx, LB_PASS_NOT_VIP, LB_ACT_PASS);
	if (!is_vip_address(&pkt->dst)) {
		if (fullnat_configured() && icmp_is_error(pkt) && fullnat_icmp_to_client(ctx, pkt, &quote, &action))
			return action;
		return verdict(ctx, LB_PASS_NOT_VIP, LB_ACT_PASS);
	}
	if (icmp_is_too_big(pkt))
		return icmp_error_to_backend(ctx, pkt, &quote);
	if (!icmp_is_echo_request(pkt))
		return unserved(ctx, pkt, LB_DROP_UNSUPPORTED_L4);
	if (icmp_echo_reply(ctx, pkt))
		return verdict(ctx, LB_DROP_MALFORMED, LB_ACT_DROP);
	return verdict(ctx, LB_TX_ICMP_ECHO, LB_ACT_TX(ctx));
}

int xdp_lb(lb_ctx *ctx)
{
	struct packet pkt = {};

	lb_ctx_prepare(ctx);
	int rc = parse_packet(ctx, &pkt);

	if (rc != LB_PARSE_OK)
		return unbalanceable(ctx, &pkt, rc);
	if (pkt.icmp)
		return handle_icmp(ctx, &pkt);

	/* Most packets a host sees are neither to a VIP nor from a backend: the
	 * filter lets them leave without a hash lookup. (Full NAT's backends count
	 * as backends there: a reply to a full-NAT source comes from one.) */
	int maybe_vip = !(addr_filter_of(&pkt.dst) & LB_FILTER_NO_VIP);
	int maybe_backend = !(addr_filter_of(&pkt.src) & LB_FILTER_NO_BACKEND);
	struct lb_config *config = config_of();
	__u32 cfg_flags = config ? config->flags : 0;
	int any_port = cfg_flags & LB_CFG_ANY_PORT;

	if (maybe_vip) {
		struct vip_info vip;

		if (vip_of(&pkt, any_port, &vip))
			return to_backend(ctx, &pkt, &vip);
	}
	if (!maybe_backend && !maybe_vip)
		return verdict(ctx, LB_PASS_NOT_VIP, LB_ACT_PASS);
	/* A reply to a full-NAT source address and port? Its tuple names the port's owner. */
	int action = 0;

	if (maybe_backend && (cfg_flags & LB_CFG_FULLNAT) && fullnat_reply(ctx, &pkt, &action))
		return action;

	/* A reply from a backend? Its endpoint names the VIP; a backend of a VIP
	 * of every port is listed under port 0, and is tried second. */
	struct endpoint source = { .addr = pkt.src, .port = pkt.sport, .proto = pkt.proto };
	struct reply_source *rs = maybe_backend ? reply_sources.lookup(&source) : NULL;
	struct vip_meta *reply_vip = NULL;
	struct flow_entry *flow = rs ? reply_flow(&pkt, rs, &reply_vip) : NULL;
	struct reply_source *rs_any_port = NULL;
	int from_backend = rs != NULL;

	if (!flow && any_port && maybe_backend) {
		source.port = 0;
		rs_any_port = reply_sources.lookup(&source);
		if (rs_any_port) {
			from_backend = 1;
			flow = reply_flow(&pkt, rs_any_port, &reply_vip);
		}
	}
	if (flow && reply_vip)
		return to_client(ctx, &pkt, flow, reply_vip);
	/* What a backend sends the LB host itself (a health check's answer) is no VIP flow's. */
	if (!from_backend || !would_forward(ctx, &pkt))
		return maybe_vip ? unserved(ctx, &pkt, LB_DROP_UNSERVED) : verdict(ctx, LB_PASS_NOT_VIP, LB_ACT_PASS);
	struct vip_meta *handshake_vip = NULL;
	__u32 handshake_vip_id = 0;
	__u32 handshake = rs ? handshake_backend(&pkt, rs, &handshake_vip, &handshake_vip_id) : LB_NO_BACKEND;

	if (handshake == LB_NO_BACKEND && rs_any_port)
		handshake = handshake_backend(&pkt, rs_any_port, &handshake_vip, &handshake_vip_id);
	if (handshake != LB_NO_BACKEND && handshake_vip)
		return handshake_reply(ctx, &pkt, handshake_vip, handshake_vip_id, handshake);
	/* A NAT backend's answer of no flow would leave with the backend's address. */
	return verdict(ctx, LB_DROP_REPLY_NO_FLOW, LB_ACT_DROP);
}

#ifdef LB_HOOK_TC
/* TC egress: the LB host's own packet to a VIP, marked for a backend (health
 * checks), goes to that backend the VIP's way: NAT rewrites the destination
 * (the flow is remembered so that to_client() hands the replies back to the
 * host as from the VIP); DSR sends it unchanged to the backend's MAC, tunnel
 * encapsulates it, and the backend answers the host from the VIP itself.
 * Every other packet passes untouched. */
int lb_egress(lb_ctx *ctx)
{
	__u32 backend_id = steer_backend_id(ctx);
	struct packet pkt = {};

	if (backend_id == LB_NO_BACKEND)
		return LB_ACT_PASS;
	lb_ctx_prepare(ctx);
	if (parse_packet(ctx, &pkt) != LB_PARSE_OK || pkt.icmp)
		return LB_ACT_PASS;
	struct vip_key vkey = { .addr = pkt.dst, .port = pkt.dport, .proto = pkt.proto };
	struct vip_info *vip = vips.lookup(&vkey);

	if (!vip) {
		vkey.port = 0; /* a VIP of every port */
		vip = vips.lookup(&vkey);
	}
	if (!vip)
		return LB_ACT_PASS;
	__u16 vip_id = vip->id;
	__u32 vip_flags = vip->flags;
	struct backend *be = backends.lookup(&backend_id);

	if (!be || !(be->flags & LB_BACKEND_IN_USE))
		return verdict(ctx, LB_DROP_NO_BACKEND, LB_ACT_DROP);
	/* The way to the backend, asked before the rewrite (which makes pkt's pointers stale);
	 * the kernel resolves the neighbour (lb_redirect_neigh). */
	struct bpf_fib_lookup fib = {};

	fib_query(&fib, ctx->ifindex, &pkt, &be->addr);
	int rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);

	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return verdict(ctx, LB_DROP_NO_ROUTE, LB_ACT_DROP);
	struct flow_key key = {};

	flow_key_of(&key, &pkt);
	struct flow_entry *flow = conn_table.lookup(&key);
	__u32 now = lb_clock(config_of());
	int known = flow && flow->backend_id == backend_id && flow->generation == be->generation;

	if (known) {
		flow_touch(flow, &pkt, now);
	} else {
		struct flow_entry entry = {
			.backend_id = backend_id, .vip_id = vip_id, .flags = LB_FLOW_LOCAL, .generation = be->generation,
			.last_seen = now,
		};

		conn_table.update(&key, &entry);
	}
	count_flow(vip_id, backend_id, pkt.len, 0, !known);
	/* Spent: the egress hook of the interface it is redirected to passes it (a DSR
	 * packet still names the VIP and would be steered again, in a loop). */
	ctx->mark = 0;
	if (vip_flags & LB_VIP_DSR) /* still to the VIP: the backend's address is only the next hop */
		return verdict(ctx, LB_FWD_STEERED, steer_redirect_via(fib.ifindex, &be->addr, pkt.ip_version));
	if (vip_flags & LB_VIP_TUNNEL) {
		if (tunnel_encap(ctx, &pkt, be))
			return verdict(ctx, LB_DROP_NO_HEADROOM, LB_ACT_DROP);
	} else {
		steer_rewrite_destination(ctx, &pkt, be);
	}
	return verdict(ctx, LB_FWD_STEERED, lb_redirect_neigh(fib.ifindex, NULL, 0, 0));
}
#endif
