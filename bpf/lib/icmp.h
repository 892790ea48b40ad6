/* ICMP errors of translated flows. A destination-unreachable (fragmentation
 * needed included), time-exceeded or parameter-problem message quotes the
 * packet it is about; about a translated flow, it is translated like that
 * flow, as Linux conntrack does it for kube-proxy (nf_nat_icmp_reply_translation
 * in net/netfilter/nf_nat_proto.c) and Cilium by hand: the quoted packet
 * becomes the one its sender sent, and the outer addresses follow. Without
 * it, path-MTU discovery through a service breaks: the client's stack finds
 * no socket for a quote naming the backend.
 *
 *   about a request (quoted: node -> backend, as translated), on its way to
 *   the client: the quote's destination becomes the frontend, its source
 *   (and the outer destination) the client when the flow was masqueraded;
 *   found by the flow's reply entry.
 *   about a reply (quoted: frontend -> client, as reverse-translated), on
 *   its way to the backend: the quote's source and the outer destination
 *   become the backend, the quote's destination (and the outer source, when
 *   the client itself sent it) the masquerade address; found by the flow's
 *   forward entry.
 *
 * An outer source that is the backend itself (or, the other way, the
 * client) is translated too, so the error seems to come from the address
 * the receiver talked to; a router's address stays. */
#ifndef LB_ICMP_H
#define LB_ICMP_H

#include <uapi/linux/icmp.h>

#include <uapi/linux/pkt_cls.h>

#include "common.h"
#include "csum.h"
#include "maps.h"
#include "parse.h"
#include "conntrack.h"
#include "lb.h"
#include "stats.h"

/* An ICMP error's quote: where it lies and the flow it names. */
struct lb_icmp_err {
	__u32 inner_off;     /* the quoted IPv4 header */
	__u32 inner_l4_off;  /* its first 8 bytes of TCP or UDP */
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8  proto;
	__u8  pad[3];
};

/* What the outer header and the quote become. */
struct lb_icmp_nat {
	__u32 outer_saddr;
	__u32 outer_daddr;
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
};

/* 0 when p is an ICMP error quoting a TCP or UDP packet whose first 8
 * bytes are in [data, data_end), with e filled in; -1 otherwise. */
LB_INLINE int lb_icmp_parse(void *data, void *data_end, const struct lb_pkt *p,
			    struct lb_icmp_err *e)
{
	struct icmphdr *icmp;
	struct iphdr *in;
	__u32 off = p->l4_off, ihl;
	__u16 *ports;

	if (p->proto != IPPROTO_ICMP || p->frag != LB_FRAG_NONE || off > LB_MAX_L4_OFF)
		return -1;
	icmp = data + off;
	if ((void *)(icmp + 1) > data_end)
		return -1;
	if (icmp->type != ICMP_DEST_UNREACH && icmp->type != ICMP_TIME_EXCEEDED &&
	    icmp->type != ICMP_PARAMETERPROB)
		return -1;
	in = (void *)(icmp + 1);
	if ((void *)(in + 1) > data_end || in->version != 4 || in->ihl < 5)
		return -1;
	if (in->protocol != IPPROTO_TCP && in->protocol != IPPROTO_UDP)
		return -1;
	/* Only a first fragment (or a whole packet) quotes ports. */
	if (in->frag_off & bpf_htons(LB_IP_OFFSET))
		return -1;
	ihl = in->ihl * 4;
	ports = (void *)in + ihl;
	if ((void *)(ports + 4) > data_end)
		return -1;
	e->inner_off = off + sizeof(*icmp);
	e->inner_l4_off = off + sizeof(*icmp) + ihl;
	e->saddr = in->saddr;
	e->daddr = in->daddr;
	e->sport = ports[0];
	e->dport = ports[1];
	e->proto = in->protocol;
	return 0;
}

/* The translation of an ICMP error whose outer header is p's: the stat
 * reason LB_STAT_ICMP_ERROR_NAT with n filled in, or -1 for an error about
 * no translated flow. Looks up conntrack without refreshing it. */
LB_INLINE int lb_icmp_decide(const struct lb_pkt *p, const struct lb_icmp_err *e,
			     __u64 now, struct lb_icmp_nat *n)
{
	/* The quoted packet seen from the other side: the flow's other direction. */
	struct lb_pkt q = {
		.saddr = e->daddr, .daddr = e->saddr,
		.sport = e->dport, .dport = e->sport, .proto = e->proto,
	};
	struct lb_rev_nat *rn;
	struct lb_backend *b;
	struct lb_ct_val *v;

	n->outer_saddr = p->saddr;
	n->outer_daddr = p->daddr;
	n->saddr = e->saddr;
	n->daddr = e->daddr;
	n->sport = e->sport;
	n->dport = e->dport;
	v = lb_ct_lookup(&q, LB_CT_REPLY, now);
	if (v) {
		rn = lb_frontend(v->svc_id);
		if (!rn)
			return -1;
		if (p->saddr == e->daddr)
			n->outer_saddr = rn->addr;
		n->daddr = rn->addr;
		n->dport = rn->port;
		if (v->flags & LB_CT_MASQ) {
			if (p->daddr == e->saddr)
				n->outer_daddr = v->nat_addr;
			n->saddr = v->nat_addr;
			n->sport = v->nat_port;
		}
		return LB_STAT_ICMP_ERROR_NAT;
	}
	v = lb_ct_lookup(&q, LB_CT_FORWARD, now);
	if (!v)
		return -1;
	b = lb_backend(v->backend_id);
	if (!b || b->addr == 0)
		return -1;
	if (p->daddr == e->saddr)
		n->outer_daddr = b->addr;
	n->saddr = b->addr;
	n->sport = b->port;
	if (v->flags & LB_CT_MASQ) {
		if (p->saddr == e->daddr)
			n->outer_saddr = v->nat_addr;
		n->daddr = v->nat_addr;
		n->dport = v->nat_port;
	}
	return LB_STAT_ICMP_ERROR_NAT;
}

/* Rewrite the packet as n says, with every checksum: the outer IPv4 one,
 * the quoted IPv4 one, the quoted L4 one when it lies within the quote
 * (UDP's always, TCP's when 18 bytes are quoted), and the ICMP one. An
 * address and its header's checksum change by opposite amounts, so the
 * ICMP checksum changes only with the ports and the quoted L4 checksum.
 * Direct writes in XDP and tc alike: every change is balanced inside its
 * checksummed region, so an skb's CHECKSUM_COMPLETE sum stays right. */
LB_INLINE int lb_icmp_nat(void *data, void *data_end, const struct lb_icmp_err *e,
			  const struct lb_icmp_nat *n)
{
	struct iphdr *ip = data + LB_ETH_LEN, *in;
	struct icmphdr *icmp;
	__u32 off = e->inner_off, l4 = e->inner_l4_off;
	__u16 *ports, *l4sum = 0, old = 0;

	if ((void *)(ip + 1) > data_end || off > LB_MAX_L4_OFF + sizeof(*icmp) ||
	    l4 > LB_MAX_L4_OFF + sizeof(*icmp) + 60)
		return -1;
	icmp = data + off - sizeof(*icmp);
	in = data + off;
	ports = data + l4;
	if ((void *)(icmp + 1) > data_end || (void *)(in + 1) > data_end ||
	    (void *)(ports + 4) > data_end)
		return -1;
	if (e->proto == IPPROTO_UDP)
		l4sum = ports + 3;
	else if ((void *)(ports + 9) <= data_end)
		l4sum = ports + 8;
	/* A UDP datagram sent without a checksum (zero) is quoted without one. */
	if (l4sum && e->proto == IPPROTO_UDP && *l4sum == 0)
		l4sum = 0;
	if (l4sum)
		old = *l4sum;
	if (n->saddr != in->saddr) {
		lb_csum_replace4(&in->check, in->saddr, n->saddr);
		if (l4sum)
			lb_csum_replace4(l4sum, in->saddr, n->saddr);
		in->saddr = n->saddr;
	}
	if (n->daddr != in->daddr) {
		lb_csum_replace4(&in->check, in->daddr, n->daddr);
		if (l4sum)
			lb_csum_replace4(l4sum, in->daddr, n->daddr);
		in->daddr = n->daddr;
	}
	if (n->sport != ports[0]) {
		lb_csum_replace2(&icmp->checksum, ports[0], n->sport);
		if (l4sum)
			lb_csum_replace2(l4sum, ports[0], n->sport);
		ports[0] = n->sport;
	}
	if (n->dport != ports[1]) {
		lb_csum_replace2(&icmp->checksum, ports[1], n->dport);
		if (l4sum)
			lb_csum_replace2(l4sum, ports[1], n->dport);
		ports[1] = n->dport;
	}
	if (l4sum) {
		if (e->proto == IPPROTO_UDP && *l4sum == 0)
			*l4sum = 0xffff;
		if (*l4sum != old)
			lb_csum_replace2(&icmp->checksum, old, *l4sum);
	}
	if (n->outer_saddr != ip->saddr) {
		lb_csum_replace4(&ip->check, ip->saddr, n->outer_saddr);
		ip->saddr = n->outer_saddr;
	}
	if (n->outer_daddr != ip->daddr) {
		lb_csum_replace4(&ip->check, ip->daddr, n->outer_daddr);
		ip->daddr = n->outer_daddr;
	}
	return 0;
}

/* An ICMP error of a translated flow, translated in place: the stat reason
 * LB_STAT_ICMP_ERROR_NAT (LB_STAT_ERROR when the rewrite failed), or -1
 * when p is no such error. */
LB_INLINE int lb_icmp_error(void *data, void *data_end, const struct lb_pkt *p)
{
	struct lb_icmp_err e = {};
	struct lb_icmp_nat n = {};

	if (lb_icmp_parse(data, data_end, p, &e) ||
	    lb_icmp_decide(p, &e, lb_now(), &n) < 0)
		return -1;
	return lb_icmp_nat(data, data_end, &e, &n) ? LB_STAT_ERROR : LB_STAT_ICMP_ERROR_NAT;
}

/* lb_icmp_error's reason, or `otherwise` for no error of a translated flow. */
LB_INLINE int lb_icmp_or(int otherwise, void *data, void *data_end, const struct lb_pkt *p)
{
	int reason = lb_icmp_error(data, data_end, p);

	return reason < 0 ? otherwise : reason;
}

/* tc egress: an ICMP error of a translated flow translated and counted,
 * with its verdict; -1 when p is none. */
LB_INLINE int lb_icmp_skb(struct __sk_buff *skb, void *data, void *data_end,
			  const struct lb_pkt *p)
{
	int reason = lb_icmp_error(data, data_end, p);

	if (reason < 0)
		return -1;
	lb_count(reason, p->len);
	return reason == LB_STAT_ERROR ? TC_ACT_SHOT : TC_ACT_OK;
}

#endif
