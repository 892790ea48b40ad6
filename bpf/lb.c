/* The datapath: service DNAT, reverse NAT and connection tracking.
 *
 *   xdp_lb_external  XDP on a node-facing device: traffic from outside the
 *                    node (NodePort, externalIPs, LoadBalancer IPs) and
 *                    replies of remote backends.
 *   tc_lb_from_pod   tc ingress on a pod's host-side veth: what a local pod
 *                    sends (every service type) and replies of local backends.
 *   tc_lb_to_pod     tc egress on a pod's host-side veth: reverse NAT of
 *                    replies of backends on the node's own network, and
 *                    ingress NetworkPolicy for what enters the pod.
 *   tc_lb_to_external tc egress on a node-facing device: reverse NAT of
 *                    replies of backends on the node's own address to
 *                    clients outside the node.
 *   sock_*4          cgroup socket hooks: ClusterIPs for the node's own
 *                    processes, translated at connect/sendmsg time.
 *
 * Both run the same three steps: parse, decide (a pure function of the
 * packet and the maps, giving a stat reason and a rewrite), apply. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#ifndef offsetof
#define offsetof(t, m) __builtin_offsetof(t, m)
#endif

#include "lb_maps.h"
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/frag.h"
#include "lib/stats.h"
#include "lib/conntrack.h"
#include "lib/lb.h"
#include "lib/nat.h"
#include "lib/reject.h"
#include "lib/sock.h"
#include "lib/policy.h"

/* A reply of a translated flow: restore the frontend as its source. */
LB_INLINE int lb_reverse(const struct lb_pkt *p, __u64 now, struct lb_nat *n)
{
	struct lb_ct_val *v = lb_ct_lookup(p, LB_CT_REPLY, now);
	struct lb_rev_nat *rn;
	__u32 svc_id;

	if (!v)
		return -1;
	svc_id = v->svc_id;
	rn = lb_rev_nat.lookup(&svc_id);
	if (!rn || rn->addr == 0)
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
			     const struct lb_backend *b)
{
	__u32 zero = 0;
	struct lb_config *cfg = lb_config.lookup(&zero);

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

/* A packet to a frontend: keep the flow's backend, or choose one. */
LB_INLINE int lb_forward(const struct lb_pkt *p, __u8 scope, __u64 now,
			 struct lb_nat *n)
{
	struct lb_svc_val *svc = lb_service(p, scope);
	struct lb_backend *b = 0;
	struct lb_ct_val *v;
	int reason = LB_STAT_DNAT_ESTABLISHED;
	__u32 id, hash, masq_addr = 0;
	__u16 masq_port = 0;

	if (!svc)
		return lb_no_service(p, scope);
	v = lb_ct_lookup(p, LB_CT_FORWARD, now);
	/* The flow's backend, while it is still one of this service's (an id
	 * freed by one service may since serve another) and the flow has not
	 * closed and started over on the same 5-tuple. */
	if (v && v->svc_id == svc->svc_id && !lb_ct_reopened(v, p))
		b = lb_backend_of(v->backend_id, svc);
	if (b) {
		lb_ct_touch(v, p, now);
		if (v->flags & LB_CT_MASQ) {
			masq_addr = v->nat_addr;
			masq_port = v->nat_port;
		}
	} else {
		/* New flow, or its backend is gone: choose again, so that a
		 * UDP client moves on at once instead of sending into a void. */
		if (!lb_source_allowed(p, svc))
			return LB_STAT_DROP_SOURCE_RANGE;
		if (svc->maglev_size == 0)
			return svc->flags & LB_SVC_LOCAL_ONLY ?
			       LB_STAT_DROP_NO_LOCAL : LB_STAT_REJECT_NO_ENDPOINTS;
		id = lb_select_backend(p, svc, now);
		b = lb_backend(id);
		if (!b)
			return LB_STAT_DROP_BACKEND_GONE;
		masq_addr = lb_masq_addr(p, svc, b);
		if (masq_addr) {
			hash = lb_flow_hash(p);
			masq_port = lb_masq_port(p, b, masq_addr, hash, now);
		}
		if (lb_ct_create(p, svc->svc_id, id, b, masq_addr, masq_port, now))
			return LB_STAT_ERROR;
		reason = LB_STAT_DNAT_NEW;
	}
	n->saddr = masq_addr ? masq_addr : p->saddr;
	n->sport = masq_addr ? masq_port : p->sport;
	n->daddr = b->addr;
	n->dport = b->port;
	return reason;
}

LB_INLINE int lb_decide(struct lb_pkt *p, void *data, void *data_end,
			__u32 len, __u8 scope, struct lb_nat *n)
{
	int reason = lb_parse_ports(data, data_end, len, p);
	__u64 now;

	if (reason >= 0)
		return reason;
	now = bpf_ktime_get_ns();
	reason = lb_reverse(p, now, n);
	if (reason >= 0)
		return reason;
	return lb_forward(p, scope, now, n);
}

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
	return reason == LB_STAT_REJECT_NO_ENDPOINTS || reason == LB_STAT_REJECT_NO_PORT;
}

LB_INLINE int lb_drops(int reason)
{
	return reason == LB_STAT_DROP_MALFORMED ||
	       reason == LB_STAT_REJECT_NO_ENDPOINTS ||
	       reason == LB_STAT_DROP_BACKEND_GONE ||
	       reason == LB_STAT_DROP_SOURCE_RANGE ||
	       reason == LB_STAT_DROP_NO_LOCAL ||
	       reason == LB_STAT_REJECT_NO_PORT ||
	       reason == LB_STAT_DROP_UNKNOWN_VIP ||
	       reason == LB_STAT_DROP_POLICY || reason == LB_STAT_ERROR;
}

int xdp_lb_external(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct lb_pkt p = {};
	struct lb_nat n = {};
	int reason = lb_decide(&p, data, data_end, data_end - data,
			       LB_SCOPE_EXTERNAL, &n);

	if (lb_rewrites(reason) && lb_nat_xdp(ctx, &p, &n))
		reason = LB_STAT_ERROR;
	lb_count(reason, p.len);
	/* A later fragment has nothing to quote: it is dropped. */
	if (lb_rejects(reason) && p.frag != LB_FRAG_LATER && lb_reject_xdp(ctx, &p) == 0)
		return XDP_TX;
	return lb_drops(reason) ? XDP_DROP : XDP_PASS;
}

/* Headers the programs read must sit in the skb's linear part. */
#define LB_PULL_LEN (LB_ETH_LEN + 60 + 60)

LB_INLINE void lb_pull(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	if (data + LB_PULL_LEN > data_end && skb->len > data_end - data)
		bpf_skb_pull_data(skb, skb->len < LB_PULL_LEN ? skb->len : LB_PULL_LEN);
}

/* A reply of a backend on the node's own network (the API server, a
 * hostNetwork pod) leaves the node's stack straight out of a device: no
 * pod veth's ingress and no XDP saw it. Its connection was judged by policy
 * already. The tc verdict, or -1 when p is no such reply. */
LB_INLINE int lb_reverse_skb(struct __sk_buff *skb, const struct lb_pkt *p)
{
	struct lb_nat n = {};
	int reason;

	if (lb_reverse(p, bpf_ktime_get_ns(), &n) < 0)
		return -1;
	reason = lb_nat_skb(skb, p, &n) ? LB_STAT_ERROR : LB_STAT_REVNAT;
	lb_count(reason, p->len);
	return reason == LB_STAT_ERROR ? TC_ACT_SHOT : TC_ACT_OK;
}

int tc_lb_from_pod(struct __sk_buff *skb)
{
	struct lb_pkt p = {};
	struct lb_nat n = {};
	void *data, *data_end;
	int reason;

	lb_pull(skb);
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	reason = lb_decide(&p, data, data_end, skb->len, LB_SCOPE_INTERNAL, &n);

	if (lb_rewrites(reason) && lb_nat_skb(skb, &p, &n))
		reason = LB_STAT_ERROR;
	/* Egress policy of the sending pod, on the translated flow. Replies of
	 * service flows (reverse NAT) belong to a connection judged already. */
	if (reason != LB_STAT_REVNAT && lb_policed(reason)) {
		struct lb_flow front = { p.saddr, p.daddr, p.sport, p.dport, p.proto };
		struct lb_flow f = front;
		int dnat = reason == LB_STAT_DNAT_NEW || reason == LB_STAT_DNAT_ESTABLISHED;

		if (dnat) {
			f.saddr = n.saddr;
			f.sport = n.sport;
			f.daddr = n.daddr;
			f.dport = n.dport;
		}
		if (lb_policy(&f, dnat ? &front : 0, p.saddr, LB_POL_EGRESS, p.tcp_flags, p.len))
			reason = LB_STAT_DROP_POLICY;
	}
	lb_count(reason, p.len);
	if (lb_rejects(reason) && p.frag != LB_FRAG_LATER && lb_reject_skb(skb, &p) == 0)
		return bpf_redirect(skb->ifindex, 0);
	return lb_drops(reason) ? TC_ACT_SHOT : TC_ACT_OK;
}

/* What is about to enter a local pod: reverse NAT of replies no other
 * program saw, then ingress policy. Counts reverse NAT and drops only. */
int tc_lb_to_pod(struct __sk_buff *skb)
{
	struct lb_pkt p = {};
	struct lb_flow f;
	void *data, *data_end;
	int reason, verdict;

	lb_pull(skb);
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	reason = lb_parse_ports(data, data_end, skb->len, &p);
	if (reason != -1 && reason != LB_STAT_PASS_OTHER_PROTO)
		return TC_ACT_OK;
	if (reason == -1) {
		verdict = lb_reverse_skb(skb, &p);
		if (verdict >= 0)
			return verdict;
	}
	f.saddr = p.saddr;
	f.daddr = p.daddr;
	f.sport = p.sport;
	f.dport = p.dport;
	f.proto = p.proto;
	if (lb_policy(&f, 0, p.daddr, LB_POL_INGRESS, p.tcp_flags, p.len)) {
		lb_count(LB_STAT_DROP_POLICY, p.len);
		return TC_ACT_SHOT;
	}
	return TC_ACT_OK;
}

/* What the node sends out of a node-facing device: replies of backends on
 * the node's own address to clients outside (a NodePort served by a
 * hostNetwork pod of this node). Only packets from that address can be
 * such replies; everything else passes without a lookup. Counts reverse
 * NAT only. */
int tc_lb_to_external(struct __sk_buff *skb)
{
	struct lb_pkt p = {};
	struct lb_config *cfg;
	void *data, *data_end;
	__u32 zero = 0;
	int verdict;

	lb_pull(skb);
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (lb_parse_ports(data, data_end, skb->len, &p) != -1)
		return TC_ACT_OK;
	cfg = lb_config.lookup(&zero);
	if (!cfg || p.saddr != cfg->node_ip)
		return TC_ACT_OK;
	verdict = lb_reverse_skb(skb, &p);
	return verdict >= 0 ? verdict : TC_ACT_OK;
}

int sock_connect4(struct bpf_sock_addr *ctx)
{
	return lb_sock_translate(ctx, 0);
}

int sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return lb_sock_translate(ctx, 1);
}

int sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	return lb_sock_reverse(ctx);
}
