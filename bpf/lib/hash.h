/* Bob Jenkins' lookup3 final mix over three words (the kernel's
 * jhash_3words). lb/datapath/userspace/programs.py computes the same function so
 * the userspace datapath agrees with the kernel on which
 * Maglev slot a flow lands in. */
#ifndef LB_HASH_H
#define LB_HASH_H

#include "common.h"

#define LB_JHASH_INITVAL 0xdeadbeef

LB_INLINE __u32 lb_rol32(__u32 w, __u32 s)
{
	return (w << s) | (w >> (32 - s));
}

LB_INLINE __u32 lb_jhash_3words(__u32 a, __u32 b, __u32 c, __u32 initval)
{
	initval += LB_JHASH_INITVAL + (3 << 2);
	a += initval;
	b += initval;
	c += initval;
	c ^= b; c -= lb_rol32(b, 14);
	a ^= c; a -= lb_rol32(c, 11);
	b ^= a; b -= lb_rol32(a, 25);
	c ^= b; c -= lb_rol32(b, 16);
	a ^= c; a -= lb_rol32(c, 4);
	b ^= a; b -= lb_rol32(a, 14);
	c ^= b; c -= lb_rol32(b, 24);
	return c;
}

#endif
