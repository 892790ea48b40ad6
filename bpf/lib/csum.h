/* Incremental Internet checksum update (RFC 1624, eqn. 3) for the XDP path,
 * where the frame carries complete checksums. The tc path uses the kernel's
 * bpf_l3/l4_csum_replace instead, which also handle CHECKSUM_PARTIAL skbs. */
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

#endif
