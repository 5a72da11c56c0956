/* The connection table's rules: when an entry is still true, when a flow has
 * been idle too long, what a packet changes in its entry. An entry names its
 * backend's generation and VIP; the backend record (looked up anyway for the
 * rewrite) says whether they still hold, so no other lookup is needed. */
#ifndef LB_CONN_H
#define LB_CONN_H

#include "consts.h"
#include "structs.h"
#include "parse.h"

#define LB_TCP_FIN 0x01
#define LB_TCP_SYN 0x02
#define LB_TCP_RST 0x04
#define LB_TCP_ACK 0x10

/* The data plane's clock: ticks of 2^30 ns (1.07 s) of the kernel's coarse
 * monotonic clock (no clock source read; a shift, where a division by 10^9
 * would cost a 64-bit divide per packet), plus the offset tests may set. */
static __always_inline __u32 lb_clock(const struct lb_config *config)
{
	__u32 now = bpf_ktime_get_coarse_ns() >> LB_TICK_SHIFT;

	return config ? now + config->clock_offset : now;
}

/* A SYN opens a connection (a SYN-ACK does not). */
static __always_inline int is_syn(const struct packet *pkt)
{
	return pkt->proto == IPPROTO_TCP && (pkt->tcp_flags & (LB_TCP_SYN | LB_TCP_ACK)) == LB_TCP_SYN;
}

static __always_inline int is_rst(const struct packet *pkt)
{
	return pkt->proto == IPPROTO_TCP && (pkt->tcp_flags & LB_TCP_RST);
}

static __always_inline int is_closing(const struct packet *pkt)
{
	return pkt->proto == IPPROTO_TCP && (pkt->tcp_flags & (LB_TCP_FIN | LB_TCP_RST));
}

static __always_inline __u32 idle_timeout(const struct lb_config *config, const struct flow_entry *flow, __u8 proto)
{
	__u32 t = 0;

	if (proto != IPPROTO_TCP) {
		if (config)
			t = config->udp_timeout;
		return t ? t : LB_UDP_TIMEOUT;
	}
	if (flow->flags & LB_FLOW_CLOSING) {
		if (config)
			t = config->tcp_closing_timeout;
		return t ? t : LB_TCP_CLOSING_TIMEOUT;
	}
	if (config)
		t = config->tcp_timeout;
	return t ? t : LB_TCP_TIMEOUT;
}

/* Is the entry still the truth about this flow of this VIP? Its backend still
 * holds the binding the entry recorded (same generation, same VIP), the flow has
 * not been idle too long, and a SYN does not go to a backend that takes no new
 * connections. Otherwise the packet is a new flow. */
static __always_inline int flow_trusted(const struct flow_entry *flow, const struct backend *be, __u32 vip_id,
					const struct packet *pkt, const struct lb_config *config, __u32 now)
{
	if (be->generation != flow->generation || be->vip_id != vip_id || flow->vip_id != vip_id)
		return 0;
	if (!(be->flags & LB_BACKEND_IN_USE))
		return 0;
	if ((be->flags & LB_BACKEND_NO_NEW) && is_syn(pkt))
		return 0;
	return now - flow->last_seen <= idle_timeout(config, flow, pkt->proto);
}

/* May a backend's reply use this entry of the client's tuple? Not once idle
 * past its timeout, and a SYN-ACK not on a closing one: the client may have
 * reused the port of a closed connection towards another VIP of the same
 * backend, and that SYN-ACK is the new connection's (a SYN to the same VIP
 * would have reopened the entry, see flow_touch). */
static __always_inline int flow_answers_reply(const struct flow_entry *flow, const struct packet *pkt,
					      const struct lb_config *config, __u32 now)
{
	if ((flow->flags & LB_FLOW_CLOSING) && pkt->proto == IPPROTO_TCP && (pkt->tcp_flags & LB_TCP_SYN))
		return 0;
	return now - flow->last_seen <= idle_timeout(config, flow, pkt->proto);
}

/* A packet of the flow: the entry was seen now (written only when the second
 * changed, to keep the cache line clean), and a FIN or an RST starts the close
 * (a SYN on the tuple starts over). */
static __always_inline void flow_touch(struct flow_entry *flow, const struct packet *pkt, __u32 now)
{
	if (flow->last_seen != now)
		flow->last_seen = now;
	if (is_closing(pkt)) {
		if (!(flow->flags & LB_FLOW_CLOSING))
			flow->flags |= LB_FLOW_CLOSING;
	} else if ((flow->flags & LB_FLOW_CLOSING) && is_syn(pkt)) {
		flow->flags &= ~LB_FLOW_CLOSING;
	}
}

#endif
