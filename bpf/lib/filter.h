/* The pre-filter: is this packet possibly service traffic? Most of a node's
 * packets are not, and the full answer (a conntrack lookup for a reply, a
 * service lookup) costs two hash-map lookups. lb_filter answers "certainly
 * not" from array reads, which the verifier inlines. Cilium gets the same
 * effect from its per-endpoint program layout; Katran from handling only
 * VIP traffic on its device. Layout and bits: bpf/lb_maps.h, lb_filter. */
#ifndef LB_FILTER_H
#define LB_FILTER_H

#include "common.h"
#include "filter_hash.h"
#include "maps.h"
#include "parse.h"

/* The bit of (kind, address, port), both in network order. */
LB_INLINE __u32 lb_filter_bit(__u32 kind, __u32 addr, __u16 port)
{
	return lb_filter_hash(kind, bpf_ntohl(addr), bpf_ntohs(port)) &
	       (LB_FILTER_WORDS * 64 - 1);
}

/* Whether `bit` is set in `w`, the filter's word that holds it (the map is
 * named in each caller: BCC takes map calls in no macro or argument). */
LB_INLINE int lb_filter_word_has(const __u64 *w, __u32 bit)
{
	return w && ((*w >> (bit & 63)) & 1);
}

LB_INLINE int lb_filter_has(__u32 kind, __u32 addr, __u16 port)
{
	__u32 bit = lb_filter_bit(kind, addr, port), word = bit >> 6;

	return lb_filter_word_has(lb_filter.lookup(&word), bit);
}

/* A pod some policy may isolate (lb_pol_endpoints holds it, or a bit it
 * shares). */
LB_INLINE int lb_pol_filter_has(__u32 addr)
{
	__u32 bit = lb_filter_bit(LB_FILTER_POLICED, addr, 0), word = bit >> 6;

	return lb_filter_word_has(lb_pol_filter.lookup(&word), bit);
}

#endif
