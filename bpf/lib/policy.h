/* NetworkPolicy on the fast path. A connection is judged on its first
 * packet, after service DNAT, so the policy sees the real backend; an
 * allowed connection is remembered in lb_ct, so its later packets and its
 * replies pass on one lookup. Only pods that some policy isolates have an
 * endpoint entry: traffic of every other pod costs one hash miss.
 *
 * The decision (lb/policy/lookup.py is its reference): the local pod's
 * endpoint entry; the remote address's identity from the ipcache (an LPM
 * trie of pod /32s and ipBlock prefixes); the rule of (pod, identity,
 * direction), falling back to identity 0 (rules open to every peer); the
 * chain of port sets it names, first matching range allows.
 *
 * What is remembered, per check, in its own key space: an entry only ever
 * stands for the check that wrote it (a sender's egress verdict must not
 * let the packet past the receiver's ingress check on the same node).
 *   LB_CT_POLICY          tuples the egress check of their SOURCE passes
 *   LB_CT_POLICY_INGRESS  tuples the ingress check of their DESTINATION passes
 * A check that allows s -> d writes s -> d in its own space and the reply
 * d -> s in the other (the same pod's other check). An egress check of a
 * service flow also writes the reply as it arrives after reverse NAT
 * (frontend -> client), since that is what the client's ingress check sees. */
#ifndef LB_POLICY_H
#define LB_POLICY_H

#include "common.h"
#include "maps.h"
#include "filter.h"
#include "conntrack.h"


LB_INLINE __u8 lb_pol_ct_dir(__u8 dir)
{
	return dir == LB_POL_INGRESS ? LB_CT_POLICY_INGRESS : LB_CT_POLICY;
}

/* The 5-tuple of a packet after translation, as policy sees it. */
struct lb_flow {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8  proto;
};

LB_INLINE struct lb_ct_key lb_pol_ct_key(const struct lb_flow *f, int reverse, __u8 ct_dir)
{
	struct lb_ct_key k = {
		.saddr = reverse ? f->daddr : f->saddr,
		.daddr = reverse ? f->saddr : f->daddr,
		.sport = reverse ? f->dport : f->sport,
		.dport = reverse ? f->sport : f->dport,
		.proto = f->proto,
		.dir = ct_dir,
	};
	return k;
}

/* A packet of a connection this check (dir) already passed, either way. */
LB_INLINE int lb_pol_known(const struct lb_flow *f, __u8 dir, __u8 tcp_flags, __u64 now)
{
	struct lb_ct_key k = lb_pol_ct_key(f, 0, lb_pol_ct_dir(dir));
	struct lb_ct_val *v = lb_ct.lookup(&k);
	struct lb_pkt p = { .proto = f->proto, .tcp_flags = tcp_flags };

	if (!v || now - v->last_seen_ns > lb_ct_lifetime_ns(v, f->proto))
		return 0;
	/* A SYN on a closed flow opens a new connection on the same 5-tuple:
	 * the policy in force now judges it. */
	if (lb_ct_reopened(v, &p))
		return 0;
	lb_ct_touch(v, &p, now);
	return 1;
}

/* `f` passed the check `dir`; `front` is the flow as the pod sent it when
 * service DNAT changed it (0 otherwise). */
LB_INLINE void lb_pol_remember(const struct lb_flow *f, const struct lb_flow *front,
			       __u8 dir, __u64 now)
{
	struct lb_ct_val v = {
		.created_ns = now,
		.last_seen_ns = now,
		/* Judged once: an allowed flow lives as long as it talks. */
		.flags = LB_CT_SEEN_REPLY,
	};
	__u8 other = dir == LB_POL_INGRESS ? LB_POL_EGRESS : LB_POL_INGRESS;
	struct lb_ct_key k = lb_pol_ct_key(f, 0, lb_pol_ct_dir(dir));

	lb_ct.update(&k, &v);
	k = lb_pol_ct_key(f, 1, lb_pol_ct_dir(other));
	lb_ct.update(&k, &v);
	if (front && (front->daddr != f->daddr || front->dport != f->dport)) {
		k = lb_pol_ct_key(front, 1, lb_pol_ct_dir(other));
		lb_ct.update(&k, &v);
	}
}

/* Does the port-set chain starting at `slot` allow (proto, port)? */
LB_INLINE int lb_pol_ports_allow(__u32 slot, __u8 proto, __u16 port)
{
	struct lb_pol_portset *ps;
	int c, i;

	for (c = 0; c < LB_POL_MAX_CHAIN; c++) {
		if (!slot)
			return 0;
		ps = lb_pol_portsets.lookup(&slot);
		if (!ps)
			return 0;
		for (i = 0; i < LB_POL_PORTS_PER_SET; i++) {
			struct lb_pol_port_range *r = &ps->ranges[i];

			if (i >= ps->count)
				break;
			if ((r->proto == LB_POL_PROTO_ANY || r->proto == proto) &&
			    r->port_lo <= port && port <= r->port_hi)
				return 1;
		}
		slot = ps->next;
	}
	return 0;
}

/* The verdict for a new connection of local pod `local` with `remote` in
 * direction `dir`: 0 allows, otherwise the id of the policy to blame. */
LB_INLINE __u32 lb_pol_judge(__u32 local, __u32 remote, __u8 proto, __u16 dport,
			     __u8 dir, const struct lb_pol_endpoint *ep)
{
	struct lb_lpm4_key pk = { .prefixlen = 32, .addr = remote };
	struct lb_pol_rule_key rk = { .ep_addr = local, .dir = dir };
	struct lb_pol_peer *peer;
	__u32 *slot, port = 0;
	__u8 isolated = dir == LB_POL_INGRESS ? LB_POL_ISOLATED_INGRESS :
						LB_POL_ISOLATED_EGRESS;
	__u32 blame = dir == LB_POL_INGRESS ? ep->ingress_policy : ep->egress_policy;

	if (!(ep->flags & isolated) || remote == local)
		return 0;
	peer = lb_pol_ipcache.lookup(&pk);
	rk.identity = peer ? peer->identity : LB_POL_IDENTITY_ANY;
	if (dir == LB_POL_INGRESS && peer && (peer->flags & LB_POL_PEER_HOST))
		return 0;
	slot = lb_pol_rules.lookup(&rk);
	if (!slot && rk.identity != LB_POL_IDENTITY_ANY) {
		rk.identity = LB_POL_IDENTITY_ANY;
		slot = lb_pol_rules.lookup(&rk);
	}
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP)
		port = bpf_ntohs(dport);
	if (slot && lb_pol_ports_allow(*slot, proto, port))
		return 0;
	return blame ? blame : 1;
}

LB_INLINE void lb_pol_count_drop(__u32 policy, __u32 bytes)
{
	struct lb_stat *s = lb_pol_drops.lookup(&policy);

	if (s) {
		s->packets++;
		s->bytes += bytes;
	}
}

/* Policy for a packet of local pod `local` (the sender for egress, the
 * receiver for ingress); `front`: see lb_pol_remember. Returns 0 to pass,
 * LB_STAT_DROP_POLICY to drop. */
LB_INLINE int lb_policy(const struct lb_flow *f, const struct lb_flow *front, __u32 local,
			__u8 dir, __u8 tcp_flags, __u32 len)
{
	struct lb_pol_endpoint *ep;
	__u64 now;
	__u32 blame;

	/* Most pods are isolated by no policy: an array read says so. */
	if (!lb_pol_filter_has(local))
		return 0;
	ep = lb_pol_endpoints.lookup(&local);
	if (!ep)
		return 0;
	now = lb_now();
	if (lb_pol_known(f, dir, tcp_flags, now))
		return 0;
	blame = lb_pol_judge(local, dir == LB_POL_INGRESS ? f->saddr : f->daddr,
			     f->proto, f->dport, dir, ep);
	if (blame) {
		lb_pol_count_drop(blame, len);
		return LB_STAT_DROP_POLICY;
	}
	lb_pol_remember(f, front, dir, now);
	return 0;
}

#endif
