/* Connection tracking: one LRU entry per direction, written on a flow's
 * first packet only (an LRU update costs ten lookups). Later packets refresh
 * last_seen in place, at most once a second. */
#ifndef LB_CONNTRACK_H
#define LB_CONNTRACK_H

#include "common.h"
#include "maps.h"
#include "parse.h"

LB_INLINE void lb_ct_key_of(const struct lb_pkt *p, __u8 dir,
			    struct lb_ct_key *k)
{
	k->saddr = p->saddr;
	k->daddr = p->daddr;
	k->sport = p->sport;
	k->dport = p->dport;
	k->proto = p->proto;
	k->dir = dir;
	k->pad = 0;
}

/* By state, so that half-open flows (a SYN flood) and closed ones leave
 * the table soon and only answered, open TCP flows live long. */
LB_INLINE __u64 lb_ct_lifetime_ns(const struct lb_ct_val *v, __u8 proto)
{
	if (proto != IPPROTO_TCP)
		return LB_CT_OTHER_LIFETIME_S * LB_NSEC_PER_SEC;
	if (v->flags & (LB_CT_SEEN_FIN | LB_CT_SEEN_RST))
		return LB_CT_TCP_CLOSING_S * LB_NSEC_PER_SEC;
	if (!(v->flags & LB_CT_SEEN_REPLY))
		return LB_CT_TCP_SYN_S * LB_NSEC_PER_SEC;
	return LB_CT_TCP_LIFETIME_S * LB_NSEC_PER_SEC;
}

/* Look up a live entry; an expired one counts as a miss (the next write
 * replaces it). */
LB_INLINE struct lb_ct_val *lb_ct_lookup(const struct lb_pkt *p, __u8 dir,
					 __u64 now)
{
	struct lb_ct_key k;
	struct lb_ct_val *v;

	lb_ct_key_of(p, dir, &k);
	v = lb_ct.lookup(&k);
	if (!v)
		return 0;
	if (now - v->last_seen_ns > lb_ct_lifetime_ns(v, p->proto))
		return 0;
	return v;
}

/* A SYN on a flow that has closed starts a new connection on the same
 * 5-tuple (a client may reuse its port at once: the server holds the
 * TIME_WAIT); it must be balanced afresh, not sent to the old backend. */
LB_INLINE int lb_ct_reopened(const struct lb_ct_val *v, const struct lb_pkt *p)
{
	return p->proto == IPPROTO_TCP &&
	       (p->tcp_flags & (LB_TCP_SYN | LB_TCP_ACK)) == LB_TCP_SYN &&
	       (v->flags & (LB_CT_SEEN_FIN | LB_CT_SEEN_RST));
}

/* The same for a reply entry: a SYN-ACK on a flow that has closed answers a
 * new connection that reuses its 5-tuple, such as one of the node's own
 * sockets on a port a masqueraded flow had used. It is no reply of ours. */
LB_INLINE int lb_ct_reply_reopened(const struct lb_ct_val *v, const struct lb_pkt *p)
{
	return p->proto == IPPROTO_TCP &&
	       (p->tcp_flags & (LB_TCP_SYN | LB_TCP_ACK)) == (LB_TCP_SYN | LB_TCP_ACK) &&
	       (v->flags & (LB_CT_SEEN_FIN | LB_CT_SEEN_RST));
}

/* A node's own connection has reopened a closed flow's reply 5-tuple (its
 * socket took the port the flow was masqueraded to): the entry becomes that
 * connection's. Its packets then pass as they are, and the entry, alive
 * while they flow, keeps new masqueraded flows off the port (lb_masq_port
 * probes on). Linux conntrack resolves the same clash the other way round,
 * giving the node's connection another source port (nf_nat_core.c,
 * get_unique_tuple). svc_id 0 means no frontend, so an ICMP error about the
 * connection is not translated either. */
LB_INLINE void lb_ct_yield(struct lb_ct_val *v, __u64 now)
{
	v->flags = LB_CT_NODE_SOCKET | LB_CT_SEEN_REPLY;
	v->svc_id = 0;
	v->nat_addr = 0;
	v->nat_port = 0;
	v->last_seen_ns = now;
}

/* Note what this packet says about the flow's state, without a map update. */
LB_INLINE void lb_ct_touch(struct lb_ct_val *v, const struct lb_pkt *p,
			   __u64 now)
{
	if (p->tcp_flags & LB_TCP_RST)
		v->flags |= LB_CT_SEEN_RST;
	else if (p->tcp_flags & LB_TCP_FIN)
		v->flags |= LB_CT_SEEN_FIN;
	if (now - v->last_seen_ns > LB_NSEC_PER_SEC)
		v->last_seen_ns = now;
}

/* The first reply of a flow: both of its entries become established. */
LB_INLINE void lb_ct_answered(struct lb_ct_val *reply, __u32 frontend_addr,
			      __u16 frontend_port, __u8 proto)
{
	struct lb_ct_key k = {
		.saddr = reply->nat_addr,
		.daddr = frontend_addr,
		.sport = reply->nat_port,
		.dport = frontend_port,
		.proto = proto,
		.dir = LB_CT_FORWARD,
	};
	struct lb_ct_val *fwd;

	reply->flags |= LB_CT_SEEN_REPLY;
	fwd = lb_ct.lookup(&k);
	if (fwd)
		fwd->flags |= LB_CT_SEEN_REPLY;
}

/* Record a new flow client -> frontend served by backend b: the forward
 * entry keeps the backend, the service port it was chosen in, the scope it
 * came from (lib/translate.h, lb_established) and, when masqueraded, the
 * source it is given; the reply entry lets replies from b be
 * reverse-translated to the frontend and, when masqueraded, back to the
 * client. */
LB_INLINE int lb_ct_create(const struct lb_pkt *p, const struct lb_svc_val *svc,
			   __u8 scope, __u32 backend_id, const struct lb_backend *b,
			   __u32 masq_addr, __u16 masq_port, __u64 now)
{
	struct lb_ct_key k;
	struct lb_ct_val v = {};

	v.created_ns = now;
	v.last_seen_ns = now;
	v.svc_id = svc->svc_id;
	v.group_id = svc->group_id;
	v.backend_id = backend_id;
	if (scope == LB_SCOPE_EXTERNAL)
		v.flags = LB_CT_EXTERNAL;
	if (masq_addr) {
		v.flags |= LB_CT_MASQ;
		v.nat_addr = masq_addr;
		v.nat_port = masq_port;
	}
	lb_ct_key_of(p, LB_CT_FORWARD, &k);
	if (lb_ct.update(&k, &v))
		return -1;

	k.saddr = b->addr;
	k.daddr = masq_addr ? masq_addr : p->saddr;
	k.sport = b->port;
	k.dport = masq_addr ? masq_port : p->sport;
	k.dir = LB_CT_REPLY;
	v.backend_id = 0;
	v.nat_addr = p->saddr;
	v.nat_port = p->sport;
	return lb_ct.update(&k, &v);
}

/* A source port for a masqueraded flow to backend b: the client's own when
 * no other flow holds it towards b, else one derived from the flow hash.
 * A few probes keep the cost bounded; a clash after them reuses a port
 * (the older flow loses its reverse entry, as an LRU eviction would). */
LB_INLINE __u16 lb_masq_port(const struct lb_pkt *p, const struct lb_backend *b,
			     __u32 masq_addr, __u32 hash, __u64 now)
{
	struct lb_ct_key k = {
		.saddr = b->addr,
		.daddr = masq_addr,
		.sport = b->port,
		.proto = p->proto,
		.dir = LB_CT_REPLY,
	};
	__u16 port = p->sport;
	struct lb_ct_val *v;
	int i;

#pragma unroll
	for (i = 0; i < 4; i++) {
		k.dport = port;
		v = lb_ct.lookup(&k);
		if (!v || now - v->last_seen_ns > lb_ct_lifetime_ns(v, p->proto) ||
		    (v->nat_addr == p->saddr && v->nat_port == p->sport))
			return port;
		/* SCTP keeps its ports (a new one would need its CRC32c
		 * recomputed): none when the client's own is taken. */
		if (p->proto == IPPROTO_SCTP)
			return 0;
		port = bpf_htons(32768 + (hash >> (i * 8)) % 28232);
	}
	return port;
}

#endif
