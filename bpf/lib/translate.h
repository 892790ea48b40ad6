/* One packet's translation, as a pure decision over the maps: a reply of
 * a translated flow gets its frontend back as its source (lb_reverse), a
 * packet to a frontend gets its flow's backend or a new one (lb_forward).
 * lb_decide runs both after parsing; the programs apply the rewrite it
 * describes (lib/nat.h). */
#ifndef LB_TRANSLATE_H
#define LB_TRANSLATE_H

#include <uapi/linux/pkt_cls.h>

#include "common.h"
#include "maps.h"
#include "parse.h"
#include "frag.h"
#include "stats.h"
#include "conntrack.h"
#include "lb.h"
#include "nat.h"

/* A reply of a translated flow: restore the frontend as its source. */
LB_INLINE int lb_reverse(const struct lb_pkt *p, __u64 now, struct lb_nat *n)
{
	struct lb_ct_val *v = lb_ct_lookup(p, LB_CT_REPLY, now);
	struct lb_rev_nat *rn;

	if (!v)
		return -1;
	if (lb_ct_reply_reopened(v, p))
		lb_ct_yield(v, now);
	if (v->flags & LB_CT_NODE_SOCKET) {
		lb_ct_touch(v, p, now);
		return -1;
	}
	rn = lb_frontend(v->svc_id);
	if (!rn)
		return -1;
	lb_ct_touch(v, p, now);
	if (!(v->flags & LB_CT_SEEN_REPLY))
		lb_ct_answered(v, rn->addr, rn->port, p->proto);
	n->saddr = rn->addr;
	n->sport = rn->port;
	n->daddr = p->daddr;
	n->dport = p->dport;
	if (v->flags & LB_CT_MASQ) {
		n->daddr = v->nat_addr;
		n->dport = v->nat_port;
	}
	return LB_STAT_REVNAT;
}

/* The source a new flow to backend b is given, 0 to keep the client's:
 * the node's address for external traffic with externalTrafficPolicy
 * Cluster (kube-proxy masquerades it), the hairpin address when a pod
 * reaches itself through a service (its reply would otherwise never leave
 * the pod: the source would be its own address). */
LB_INLINE __u32 lb_masq_addr(const struct lb_pkt *p, const struct lb_svc_val *svc,
			     const struct lb_backend *b, const struct lb_config *cfg)
{
	if (!cfg)
		return 0;
	/* A backend on the node's own address (a hostNetwork pod) is reached
	 * through the node's stack, which keeps the client's source: kube-proxy
	 * masquerades in POSTROUTING, which locally delivered packets never
	 * pass. Masqueraded to the node's address, the reply would never leave
	 * the node. The reply is reverse-translated on its way out instead
	 * (tc_lb_to_external, tc_lb_to_pod). */
	if (b->addr == cfg->node_ip)
		return 0;
	if (svc->flags & LB_SVC_MASQUERADE)
		return cfg->node_ip;
	if (b->addr == p->saddr)
		return cfg->hairpin_ip;
	return 0;
}

/* The backend of an established flow to a frontend, 0 when the flow must
 * be balanced (again). Its forward entry says everything: no service
 * lookup, which costs as much as the conntrack lookup itself (Cilium and
 * Katran look the service up first; their entries do not name the choice's
 * service port). The choice stands while the frontend still has the
 * entry's reverse-NAT id (lb_rev_nat is zeroed when a frontend goes), the
 * backend id still belongs to the service port it was chosen in (an id
 * freed by one service may since serve another), the flow came the way it
 * was created (a pod's flow is no outside client's) and it has not closed
 * and started over on the same 5-tuple. */
LB_INLINE struct lb_backend *lb_established(const struct lb_pkt *p, struct lb_ct_val *v,
					    __u8 scope)
{
	struct lb_rev_nat *rn;
	struct lb_backend *b;

	if (!v || lb_ct_reopened(v, p))
		return 0;
	if (!!(v->flags & LB_CT_EXTERNAL) != (scope == LB_SCOPE_EXTERNAL))
		return 0;
	rn = lb_frontend(v->svc_id);
	if (!rn || rn->addr != p->daddr || rn->port != p->dport)
		return 0;
	b = lb_backend(v->backend_id);
	return b && b->group_id == v->group_id ? b : 0;
}

/* A packet to a frontend: keep the flow's backend, or choose one. */
LB_INLINE int lb_forward(const struct lb_pkt *p, __u8 scope, __u64 now,
			 const struct lb_config *cfg, struct lb_nat *n)
{
	struct lb_ct_val *v = lb_ct_lookup(p, LB_CT_FORWARD, now);
	struct lb_backend *b = lb_established(p, v, scope);
	int reason = LB_STAT_DNAT_ESTABLISHED;
	__u32 id, hash, masq_addr = 0;
	__u16 masq_port = 0;
	struct lb_svc_val *svc;

	if (b) {
		lb_ct_touch(v, p, now);
		if (v->flags & LB_CT_MASQ) {
			masq_addr = v->nat_addr;
			masq_port = v->nat_port;
		}
	} else {
		/* New flow, or its backend is gone: choose again, so that a
		 * UDP client moves on at once instead of sending into a void. */
		svc = lb_service(p, scope);
		if (!svc)
			return lb_no_service(p, scope, cfg);
		if (!lb_source_allowed(p, svc))
			return LB_STAT_DROP_SOURCE_RANGE;
		if (svc->maglev_size == 0)
			return svc->flags & LB_SVC_LOCAL_ONLY ?
			       LB_STAT_DROP_NO_LOCAL : LB_STAT_REJECT_NO_ENDPOINTS;
		id = lb_select_backend(p, svc, now);
		b = lb_backend(id);
		if (!b)
			return LB_STAT_DROP_BACKEND_GONE;
		masq_addr = lb_masq_addr(p, svc, b, cfg);
		if (masq_addr) {
			hash = lb_flow_hash(p);
			masq_port = lb_masq_port(p, b, masq_addr, hash, now);
			if (!masq_port)
				return LB_STAT_ERROR;
		}
		if (lb_ct_create(p, svc, scope, id, b, masq_addr, masq_port, now))
			return LB_STAT_ERROR;
		reason = LB_STAT_DNAT_NEW;
	}
	n->saddr = masq_addr ? masq_addr : p->saddr;
	n->sport = masq_addr ? masq_port : p->sport;
	n->daddr = b->addr;
	n->dport = b->port;
	return reason;
}

/* A source no packet from outside can have: Linux's martian sources
 * (ip_route_input_slow in net/ipv4/route.c: multicast, limited broadcast,
 * 0.0.0.0/8 except to a broadcast, loopback) and the node's own addresses.
 * Checked before any lookup, so none is translated or masqueraded. */
LB_INLINE int lb_martian(const struct lb_pkt *p, const struct lb_config *cfg)
{
	__u32 s = bpf_ntohl(p->saddr), d = bpf_ntohl(p->daddr);

	if ((s >> 28) == 0xe || s == 0xffffffff)
		return 1;
	/* A DHCP client's discover: 0.0.0.0 to the limited broadcast. */
	if (d == 0xffffffff || (s == 0 && d == 0))
		return 0;
	if ((s >> 24) == 0 || (s >> 24) == 127)
		return 1;
	if (!cfg)
		return 0;
#pragma unroll
	for (int i = 0; i < LB_MAX_NODE_IPS; i++)
		if (cfg->node_ips[i] && cfg->node_ips[i] == p->saddr)
			return 1;
	return 0;
}

/* cfg: lb_config's entry, read once per packet by the caller (0 while
 * the agent has not written it). */
LB_INLINE int lb_decide(struct lb_pkt *p, void *data, void *data_end,
			__u32 len, __u8 scope, const struct lb_config *cfg,
			struct lb_nat *n)
{
	int reason = lb_parse_ports(data, data_end, len, p);
	int front, back;
	__u64 now;

	if (reason >= 0)
		return reason;
	if (scope == LB_SCOPE_EXTERNAL && lb_martian(p, cfg))
		return LB_STAT_DROP_MARTIAN;
	/* A reply comes from a backend, a request goes to a frontend: the
	 * pre-filter rules out each lookup that cannot match. */
	front = lb_filter_has(LB_FILTER_FRONTEND, p->daddr, p->dport);
	back = lb_filter_has(LB_FILTER_BACKEND, p->saddr, p->sport);
	if (!front && !back)
		return lb_no_service(p, scope, cfg);
	now = lb_now();
	if (back) {
		reason = lb_reverse(p, now, n);
		if (reason >= 0)
			return reason;
	}
	if (!front)
		return lb_no_service(p, scope, cfg);
	return lb_forward(p, scope, now, cfg, n);
}

/* A reply of a backend on the node's own network (the API server, a
 * hostNetwork pod) leaves the node's stack straight out of a device: no
 * pod veth's ingress and no XDP saw it. Its connection was judged by policy
 * already. The tc verdict, or -1 when p is no such reply. */
LB_INLINE int lb_reverse_skb(struct __sk_buff *skb, const struct lb_pkt *p)
{
	struct lb_nat n = {};
	int reason;

	if (!lb_filter_has(LB_FILTER_BACKEND, p->saddr, p->sport) ||
	    lb_reverse(p, lb_now(), &n) < 0)
		return -1;
	reason = lb_nat_skb(skb, p, &n) ? LB_STAT_ERROR : LB_STAT_REVNAT;
	lb_count(reason, p->len);
	return reason == LB_STAT_ERROR ? TC_ACT_SHOT : TC_ACT_OK;
}

#endif
