/* The flow hash that picks a Maglev slot: MurmurHash3 (x86_32) over the
 * 5-tuple's 32-bit words. lb/flowhash.py computes the same function. */
#ifndef LB_HASH_H
#define LB_HASH_H

#define LB_HASH_SEED 0x9747b28cU

static __always_inline __u32 rotl32(__u32 x, int r)
{
	return (x << r) | (x >> (32 - r));
}

static __always_inline __u32 murmur_mix(__u32 h, __u32 k)
{
	k *= 0xcc9e2d51U;
	k = rotl32(k, 15);
	k *= 0x1b873593U;
	h ^= k;
	h = rotl32(h, 13);
	return h * 5 + 0xe6546b64U;
}

static __always_inline __u32 murmur_final(__u32 h, __u32 len)
{
	h ^= len;
	h ^= h >> 16;
	h *= 0x85ebca6bU;
	h ^= h >> 13;
	h *= 0xc2b2ae35U;
	return h ^ (h >> 16);
}

/* Words are hashed as loaded from the packet (network order), ports packed
 * as (sport << 16 | dport) of their network-order values, then the protocol. */
static __always_inline __u32 flow_hash(const union lb_addr *src, const union lb_addr *dst,
				       __be16 sport, __be16 dport, __u8 proto)
{
	__u32 h = LB_HASH_SEED;

#pragma unroll
	for (int i = 0; i < 4; i++)
		h = murmur_mix(h, src->w[i]);
#pragma unroll
	for (int i = 0; i < 4; i++)
		h = murmur_mix(h, dst->w[i]);
	h = murmur_mix(h, ((__u32)sport << 16) | dport);
	h = murmur_mix(h, proto);
	return murmur_final(h, 40);
}

/* A VIP key's slot in vip_slots (lb/addrfilter.py computes the same): the
 * address's words and the port (as loaded) and protocol, hashed as addr_bucket. */
static __always_inline __u32 vip_slot(const union lb_addr *addr, __be16 port, __u8 proto)
{
	return ((addr->w[0] ^ addr->w[1] ^ addr->w[2] ^ addr->w[3] ^ ((__u32)port << 8) ^ proto) * 0x9e3779b1U) >>
	       (32 - LB_VIP_SLOT_BITS);
}

/* An address's bucket in the address filter: a multiplicative hash of its words
 * as loaded (lb/addrfilter.py computes the same). */
static __always_inline __u32 addr_bucket(const union lb_addr *addr)
{
	return ((addr->w[0] ^ addr->w[1] ^ addr->w[2] ^ addr->w[3]) * 0x9e3779b1U) >> (32 - LB_ADDR_FILTER_BITS);
}

#endif
