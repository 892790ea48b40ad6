/* Incremental Internet checksum update (RFC 1624, eqn. 3) for the XDP path,
 * where the frame carries complete checksums. The tc path updates L4 sums
 * with the kernel's bpf_l4_csum_replace, which also handles CHECKSUM_PARTIAL
 * skbs; the IPv4 header's sum, which no device offloads, it updates itself
 * with the kernel's own arithmetic (lb_csum_replace4_kernel), so the bytes
 * are those bpf_l3_csum_replace would write, one helper call cheaper. */
#ifndef LB_CSUM_H
#define LB_CSUM_H

#include "common.h"

LB_INLINE __u16 lb_csum_fold(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

LB_INLINE void lb_csum_replace4(__u16 *sum, __u32 from, __u32 to)
{
	__u32 s = (__u16)~*sum;

	s += (~from & 0xffff) + (~from >> 16) + (to & 0xffff) + (to >> 16);
	*sum = ~lb_csum_fold(s);
}

LB_INLINE void lb_csum_replace2(__u16 *sum, __u16 from, __u16 to)
{
	__u32 s = (__u16)~*sum;

	s += (__u16)~from + to;
	*sum = ~lb_csum_fold(s);
}

/* The kernel's csum_replace4 (include/net/checksum.h), which is what
 * bpf_l3_csum_replace applies: its result differs from RFC 1624's only in
 * which of the two zeros it writes. */
LB_INLINE __u32 lb_wsum_add(__u32 a, __u32 b)
{
	__u32 r = a + b;

	return r + (r < b);
}

LB_INLINE void lb_csum_replace4_kernel(__u16 *sum, __u32 from, __u32 to)
{
	__u32 tmp = lb_wsum_add(~(__u32)*sum, ~from);

	*sum = ~lb_csum_fold(lb_wsum_add(tmp, to));
}

#endif
