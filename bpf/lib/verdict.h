/* Verdict classes: which stat reasons rewrite the packet, are policed, are
 * answered with an ICMP error, are dropped. The userspace twin and
 * lb/verdicts.py read the same reasons. */
#ifndef LB_VERDICT_H
#define LB_VERDICT_H

#include "../lb_maps.h"
#include "common.h"

LB_INLINE int lb_rewrites(int reason)
{
	return reason == LB_STAT_DNAT_NEW || reason == LB_STAT_DNAT_ESTABLISHED ||
	       reason == LB_STAT_REVNAT;
}

/* Packets policy looks at: whole IPv4 packets, translated or not. */
LB_INLINE int lb_policed(int reason)
{
	return reason == LB_STAT_DNAT_NEW || reason == LB_STAT_DNAT_ESTABLISHED ||
	       reason == LB_STAT_PASS_NOT_SERVICE || reason == LB_STAT_PASS_OTHER_PROTO;
}

LB_INLINE int lb_rejects(int reason)
{
	return reason == LB_STAT_REJECT_NO_ENDPOINTS || reason == LB_STAT_REJECT_NO_PORT ||
	       reason == LB_STAT_REJECT_FRAG_NEEDED;
}

/* A rejected packet is dropped too when no ICMP answer can be made. */
LB_INLINE int lb_drops(int reason)
{
	return lb_rejects(reason) ||
	       reason == LB_STAT_DROP_MALFORMED ||
	       reason == LB_STAT_DROP_BACKEND_GONE ||
	       reason == LB_STAT_DROP_SOURCE_RANGE ||
	       reason == LB_STAT_DROP_NO_LOCAL ||
	       reason == LB_STAT_DROP_UNKNOWN_VIP ||
	       reason == LB_STAT_DROP_POLICY || reason == LB_STAT_ERROR ||
	       reason == LB_STAT_DROP_MARTIAN;
}

#endif
