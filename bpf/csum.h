/* Incremental checksum updates (RFC 1624: HC' = ~(~HC + ~m + m')). One's
 * complement sums are byte-order independent, so values stay in network order. */
#ifndef LB_CSUM_H
#define LB_CSUM_H

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

/* The full checksum of a new IPv4 header without options (its check field zero). */
static __always_inline __u16 ipv4_header_csum(const void *ip)
{
	const __u16 *word = ip;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += word[i];
	return ~csum_fold32(sum) & 0xffff;
}

#endif
