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
 * The packet programs run the same three steps: parse, decide (a pure
 * function of the packet and the maps, giving a stat reason and a
 * rewrite: lib/translate.h), apply (lib/nat.h). This file holds the entry
 * points only. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "lib/common.h"
#include "lib/icmp.h"
#include "lib/pmtu.h"
#include "lib/stats.h"
#include "lib/policy.h"
#include "lib/reject.h"
#include "lib/sock.h"
#include "lib/translate.h"
#include "lib/verdict.h"

int xdp_lb_external(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct lb_pkt p = {};
	struct lb_nat n = {};
	struct lb_config *cfg = lb_cfg();
	__u32 mtu = 0;
	int reason = lb_decide(&p, data, data_end, data_end - data,
			       LB_SCOPE_EXTERNAL, cfg, &n);

	if (lb_rewrites(reason)) {
		mtu = lb_path_mtu_xdp(ctx, &p, &n, cfg);
		if (mtu)
			reason = LB_STAT_REJECT_FRAG_NEEDED;
		else if (lb_nat_xdp(ctx, &p, &n))
			reason = LB_STAT_ERROR;
	}
	if (reason == LB_STAT_PASS_OTHER_PROTO)
		reason = lb_icmp_or(reason, data, data_end, &p);
	lb_count(reason, p.len);
	/* A later fragment has nothing to quote: it is dropped. */
	if (lb_rejects(reason) && p.frag != LB_FRAG_LATER && lb_reject_xdp(ctx, &p, mtu) == 0)
		return XDP_TX;
	return lb_drops(reason) ? XDP_DROP : XDP_PASS;
}

int tc_lb_from_pod(struct __sk_buff *skb)
{
	struct lb_pkt p = {};
	struct lb_nat n = {};
	void *data, *data_end;
	struct lb_config *cfg = lb_cfg();
	int reason;

	lb_pull(skb, &data, &data_end);
	reason = lb_decide(&p, data, data_end, skb->len, LB_SCOPE_INTERNAL, cfg, &n);

	if (lb_rewrites(reason) && lb_nat_skb(skb, &p, &n))
		reason = LB_STAT_ERROR;
	if (reason == LB_STAT_PASS_OTHER_PROTO)
		reason = lb_icmp_or(reason, data, data_end, &p);
	/* Egress policy of the sending pod, on the translated flow. Replies of
	 * service flows (reverse NAT) and their ICMP errors belong to a
	 * connection judged already (lb_policed). */
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

	lb_pull(skb, &data, &data_end);
	reason = lb_parse_ports(data, data_end, skb->len, &p);
	if (reason != -1 && reason != LB_STAT_PASS_OTHER_PROTO)
		return TC_ACT_OK;
	if (reason == -1) {
		verdict = lb_reverse_skb(skb, &p);
		if (verdict >= 0)
			return verdict;
	} else {
		/* An error of a flow to a service (the node's own, e.g.
		 * fragmentation needed): its connection was judged already. */
		verdict = lb_icmp_skb(skb, data, data_end, &p);
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
	int reason, verdict;

	lb_pull(skb, &data, &data_end);
	reason = lb_parse(data, data_end, skb->len, &p);
	/* ICMP errors of service flows, the node's own among them (e.g.
	 * fragmentation needed on the way to a backend). */
	if (reason == LB_STAT_PASS_OTHER_PROTO) {
		verdict = lb_icmp_skb(skb, data, data_end, &p);
		return verdict >= 0 ? verdict : TC_ACT_OK;
	}
	/* Only replies on the node's own address are ours: the rest (everything
	 * the node forwards) leaves untouched and records no fragment. */
	if (reason != -1)
		return TC_ACT_OK;
	cfg = lb_cfg();
	if (!cfg || p.saddr != cfg->node_ip || lb_frag_ports(&p) != -1)
		return TC_ACT_OK;
	verdict = lb_reverse_skb(skb, &p);
	return verdict >= 0 ? verdict : TC_ACT_OK;
}

int sock_connect4(struct bpf_sock_addr *ctx)
{
	/* A connected UDP socket is remembered too: recvmsg then reads the
	 * service, and the agent can find it when its backend goes away. */
	return lb_sock_translate(ctx, ctx->protocol == IPPROTO_UDP);
}

int sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return lb_sock_translate(ctx, 1);
}

int sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	return lb_sock_reverse(ctx);
}
