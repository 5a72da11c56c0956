/* Checksum updates after a rewrite. A rewrite writes its fields first, then
 * tells the checksums that cover them what changed (csum_*_replace*):
 * - XDP: in place, RFC 1624 (HC' = ~(~HC + ~m + m')), right for a full
 *   checksum. Native XDP frames carry one where lbctl attach uses native mode
 *   (an interface whose frames may carry a partial checksum gets generic XDP:
 *   lb/loader.py).
 * - TC: by the kernel's helpers (bpf_l3_csum_replace, bpf_l4_csum_replace),
 *   by offset. An skb may still carry a partial checksum (CHECKSUM_PARTIAL: the
 *   field holds only the pseudo-header sum, a local sender's veth or tap left
 *   the rest to the egress), which an RFC 1624 update gets wrong and the
 *   helpers get right. They leave every pointer into the packet stale.
 * One's complement sums are byte-order independent: values stay in network order. */
#ifndef LB_CSUM_H
#define LB_CSUM_H

#include "ctx.h"

static __always_inline __u32 csum_fold32(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	return (sum & 0xffff) + (sum >> 16);
}

static __always_inline __u32 csum_add_word32(__u32 sum, __u32 v)
{
	return sum + (v & 0xffff) + (v >> 16);
}

/* Replace a 32-bit field covered by *check. */
static __always_inline void lb_csum_replace4(__u16 *check, __u32 from, __u32 to)
{
	__u32 sum = ~(__u32)*check & 0xffff;

	sum = csum_add_word32(sum, ~from);
	sum = csum_add_word32(sum, to);
	*check = ~csum_fold32(sum) & 0xffff;
}

/* Replace a 16-bit field covered by *check. */
static __always_inline void lb_csum_replace2(__u16 *check, __u16 from, __u16 to)
{
	__u32 sum = ~(__u32)*check & 0xffff;

	sum += (__u16)~from;
	sum += to;
	*check = ~csum_fold32(sum) & 0xffff;
}

#ifndef LB_HOOK_TC

/* The checksums a rewrite must keep right: the IPv4 header's (NULL: none, or
 * IPv6) and the L4 one (NULL: UDP without checksum, or none covers the field). */
struct csum_target {
	__u16 *l3_check;
	__u16 *l4_check;
	__u8 udp; /* a UDP checksum that computes to zero is sent as all ones (RFC 768) */
};

static __always_inline void csum_l4_fix_zero(const struct csum_target *t)
{
	if (t->udp && *t->l4_check == 0)
		*t->l4_check = 0xffff;
}

/* A 16-bit field of the IP header (the TTL's word). */
static __always_inline int csum_l3_replace2(lb_ctx *ctx, const struct csum_target *t, __be16 from, __be16 to)
{
	if (t->l3_check)
		lb_csum_replace2(t->l3_check, from, to);
	return 0;
}

/* A 32-bit word of an address: the IPv4 header and the pseudo-header the L4 checksum covers. */
static __always_inline int csum_addr_replace4(lb_ctx *ctx, const struct csum_target *t, __be32 from, __be32 to)
{
	if (t->l3_check)
		lb_csum_replace4(t->l3_check, from, to);
	if (t->l4_check) {
		lb_csum_replace4(t->l4_check, from, to);
		csum_l4_fix_zero(t);
	}
	return 0;
}

/* The four words of an IPv6 address (IPv6 has no header checksum: the L4
 * one's pseudo-header only), in one update: one's complement sums fold to the
 * same value however they are grouped, so it equals four updates of a word
 * each (csum_addr_replace4, as the reference model does them) -- exactly for
 * TCP and ICMP, and for UDP too, whose zero is all ones either way. */
static __always_inline int csum_addr6_replace(lb_ctx *ctx, const struct csum_target *t, const __be32 *from,
					      const __be32 *to)
{
	if (!t->l4_check)
		return 0;
	__u32 sum = ~(__u32)*t->l4_check & 0xffff;

#pragma unroll
	for (int i = 0; i < 4; i++) {
		sum = csum_add_word32(sum, ~from[i]);
		sum = csum_add_word32(sum, to[i]);
	}
	*t->l4_check = ~csum_fold32(sum) & 0xffff; /* sum < 17 * 0xffff: two folds do */
	csum_l4_fix_zero(t);
	return 0;
}

/* A field of the L4 header or payload (a port, an ICMP type, a quoted address). */
static __always_inline int csum_l4_replace4(lb_ctx *ctx, const struct csum_target *t, __be32 from, __be32 to)
{
	if (t->l4_check) {
		lb_csum_replace4(t->l4_check, from, to);
		csum_l4_fix_zero(t);
	}
	return 0;
}

static __always_inline int csum_l4_replace2(lb_ctx *ctx, const struct csum_target *t, __be16 from, __be16 to)
{
	if (t->l4_check) {
		lb_csum_replace2(t->l4_check, from, to);
		csum_l4_fix_zero(t);
	}
	return 0;
}

#else

/* The same by offset into the packet (0: no such checksum). */
struct csum_target {
	__u32 l3_check;
	__u32 l4_check;
	__u64 l4_flags; /* BPF_F_MARK_MANGLED_0 for UDP: a zero result is sent as all ones */
};

static __always_inline int csum_l3_replace2(lb_ctx *ctx, const struct csum_target *t, __be16 from, __be16 to)
{
	if (t->l3_check)
		return bpf_l3_csum_replace(ctx, t->l3_check, from, to, 2);
	return 0;
}

static __always_inline int csum_addr_replace4(lb_ctx *ctx, const struct csum_target *t, __be32 from, __be32 to)
{
	int err = 0;

	if (t->l3_check)
		err |= bpf_l3_csum_replace(ctx, t->l3_check, from, to, 4);
	if (t->l4_check)
		err |= bpf_l4_csum_replace(ctx, t->l4_check, from, to, t->l4_flags | BPF_F_PSEUDO_HDR | 4);
	return err;
}

/* The helpers take a word at a time. */
static __always_inline int csum_addr6_replace(lb_ctx *ctx, const struct csum_target *t, const __be32 *from,
					      const __be32 *to)
{
	int err = 0;

#pragma unroll
	for (int i = 0; i < 4; i++)
		err |= csum_addr_replace4(ctx, t, from[i], to[i]);
	return err;
}

static __always_inline int csum_l4_replace4(lb_ctx *ctx, const struct csum_target *t, __be32 from, __be32 to)
{
	if (t->l4_check)
		return bpf_l4_csum_replace(ctx, t->l4_check, from, to, t->l4_flags | 4);
	return 0;
}

static __always_inline int csum_l4_replace2(lb_ctx *ctx, const struct csum_target *t, __be16 from, __be16 to)
{
	if (t->l4_check)
		return bpf_l4_csum_replace(ctx, t->l4_check, from, to, t->l4_flags | 2);
	return 0;
}

#endif

#endif
