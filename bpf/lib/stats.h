/* Per-CPU counters, one per verdict reason. */
#ifndef LB_STATS_H
#define LB_STATS_H

#include "common.h"
#include "maps.h"

LB_INLINE void lb_count(__u32 reason, __u32 bytes)
{
	struct lb_stat *s = lb_stats.lookup(&reason);

	if (s) {
		s->packets++;
		s->bytes += bytes;
	}
}

#endif
