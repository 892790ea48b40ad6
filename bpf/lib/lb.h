/* Service lookup and backend selection: Maglev over the 5-tuple, and the
 * client's last backend while its session affinity lasts. */
#ifndef LB_LB_H
#define LB_LB_H

#include "common.h"
#include "maps.h"
#include "hash.h"
#include "parse.h"
#include "filter.h"

LB_INLINE struct lb_svc_val *lb_service(const struct lb_pkt *p, __u8 scope)
{
	struct lb_svc_key k = {
		.addr = p->daddr,
		.port = p->dport,
		.proto = p->proto,
		.scope = scope,
	};

	return lb_services.lookup(&k);
}

/* A backend id that no longer has an address was removed by the agent. */
LB_INLINE struct lb_backend *lb_backend(__u32 id)
{
	struct lb_backend *b;

	if (id == 0)
		return 0;
	b = lb_backends.lookup(&id);
	if (!b || b->addr == 0)
		return 0;
	return b;
}

/* In a service CIDR: from lb_config's copies, or, when they are more than
 * it holds, from the trie. */
LB_INLINE int lb_in_svc_cidr(__u32 addr, const struct lb_config *cfg)
{
	struct lb_lpm4_key k = { .prefixlen = 32, .addr = addr };

	if (!cfg)
		return 0;
	if (cfg->svc_cidrs_spill)
		return lb_svc_cidrs.lookup(&k) != 0;
#pragma unroll
	for (int i = 0; i < LB_MAX_SVC_CIDRS; i++)
		if (cfg->svc_cidr_mask[i] && (addr & cfg->svc_cidr_mask[i]) == cfg->svc_cidr_net[i])
			return 1;
	return 0;
}

/* kube-proxy's answer for a packet to no service: REJECT at a ClusterIP on
 * a port it does not have, DROP in the service CIDR where nothing lives,
 * otherwise not ours. Only pods reach ClusterIPs. */
LB_INLINE int lb_no_service(const struct lb_pkt *p, __u8 scope, const struct lb_config *cfg)
{
	__u32 addr = p->daddr;

	if (scope != LB_SCOPE_INTERNAL)
		return LB_STAT_PASS_NOT_SERVICE;
	if (lb_filter_has(LB_FILTER_VIP, addr, 0) && lb_vips.lookup(&addr))
		return LB_STAT_REJECT_NO_PORT;
	if (lb_in_svc_cidr(addr, cfg))
		return LB_STAT_DROP_UNKNOWN_VIP;
	return LB_STAT_PASS_NOT_SERVICE;
}

/* loadBalancerSourceRanges: only listed sources reach the frontend. */
LB_INLINE int lb_source_allowed(const struct lb_pkt *p, const struct lb_svc_val *svc)
{
	struct lb_src_range_key k = {
		.prefixlen = 64,
		.svc_id = bpf_htonl(svc->svc_id),
		.addr = p->saddr,
	};

	if (!(svc->flags & LB_SVC_SOURCE_RANGES))
		return 1;
	return lb_source_ranges.lookup(&k) != 0;
}

/* A backend of this service's port (ids are reused once freed). */
LB_INLINE struct lb_backend *lb_backend_of(__u32 id, const struct lb_svc_val *svc)
{
	struct lb_backend *b = lb_backend(id);

	return b && b->group_id == svc->group_id ? b : 0;
}

LB_INLINE __u32 lb_flow_hash(const struct lb_pkt *p)
{
	return lb_jhash_3words(p->saddr, p->daddr,
			       ((__u32)p->sport << 16) | p->dport, p->proto);
}

LB_INLINE __u32 lb_maglev_pick(const struct lb_svc_val *svc, __u32 hash)
{
	__u32 slot, *id;

	if (svc->maglev_size == 0)
		return 0;
	slot = svc->maglev_off + hash % svc->maglev_size;
	id = lb_maglev.lookup(&slot);
	return id ? *id : 0;
}

/* ClientIP affinity as kube-proxy's `recent` match does it: the client's
 * last backend is reused while it exists and the client opened a connection
 * within the timeout; every new connection refreshes the timer. A fresh
 * pick spreads as any new flow does (kube-proxy's is random): hashing the
 * client alone would hand it the same backend each time its affinity
 * expired. */
LB_INLINE __u32 lb_affinity_pick(const struct lb_pkt *p,
				 const struct lb_svc_val *svc, __u64 now)
{
	struct lb_affinity_key k = {
		.client = p->saddr,
		.group_id = svc->group_id |
			    (svc->flags & LB_SVC_LOCAL_ONLY ? LB_AFFINITY_LOCAL_SET : 0),
	};
	struct lb_affinity_val *a, fresh = {};
	__u64 timeout = (__u64)svc->affinity_timeout * LB_NSEC_PER_SEC;
	__u32 id;

	a = lb_affinity.lookup(&k);
	if (a && now - a->last_used_ns <= timeout && lb_backend_of(a->backend_id, svc)) {
		a->last_used_ns = now;
		return a->backend_id;
	}
	id = lb_maglev_pick(svc, lb_flow_hash(p));
	if (id) {
		fresh.backend_id = id;
		fresh.last_used_ns = now;
		lb_affinity.update(&k, &fresh);
	}
	return id;
}

LB_INLINE __u32 lb_select_backend(const struct lb_pkt *p,
				  const struct lb_svc_val *svc, __u64 now)
{
	if (svc->flags & LB_SVC_AFFINITY)
		return lb_affinity_pick(p, svc, now);
	return lb_maglev_pick(svc, lb_flow_hash(p));
}

#endif
