/* The pre-filter's hash over host-order values, on its own so that the
 * datapath (filter.h) and the agent's native library (lb/native.c) compile
 * the same lines; lb/encoding.py, filter_bit, is the same function for the
 * userspace twin. A multiplicative mix, then two xorshift rounds, so that
 * neighbouring addresses and ports land far apart. */
#ifndef LB_FILTER_HASH_H
#define LB_FILTER_HASH_H

#include <linux/types.h>

/* Inlined as LB_INLINE inlines, without common.h, which userspace lacks. */
static inline __attribute__((always_inline))
__u32 lb_filter_hash(__u32 kind, __u32 addr, __u32 port)
{
	__u32 x = addr * 0x9e3779b1 + ((port << 2) | kind) * 0x85ebca77;

	x ^= x >> 15;
	x *= 0x2c1b3c6d;
	x ^= x >> 12;
	return x;
}

#endif
