/* Address and port rewrites. One description of the rewrite (struct lb_nat),
 * two ways to apply it: direct writes in XDP, helpers on an skb.
 * SCTP's CRC32c covers no IP address, so an address rewrite leaves it
 * alone; its ports are never rewritten (the agent programs SCTP only where
 * port and targetPort are equal, as Cilium does), and a rewrite that would
 * change one fails. */
#ifndef LB_NAT_H
#define LB_NAT_H

#include "common.h"
#include "csum.h"
#include "parse.h"

/* The packet's new source and destination (network order). */
struct lb_nat {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
};

LB_INLINE __u32 lb_l4_csum_off(const struct lb_pkt *p)
{
	return p->l4_off + (p->proto == IPPROTO_TCP ?
			    offsetof(struct tcphdr, check) :
			    offsetof(struct udphdr, check));
}

LB_INLINE int lb_nat_xdp(struct xdp_md *ctx, const struct lb_pkt *p,
			 const struct lb_nat *n)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + LB_ETH_LEN;
	__u32 l4_off = p->l4_off;
	__u16 *ports = 0, *l4sum = 0;
	int nosum;

	if ((void *)(ip + 1) > data_end)
		return -1;
	if (p->proto == IPPROTO_SCTP) {
		if (p->frag != LB_FRAG_LATER &&
		    (n->sport != p->sport || n->dport != p->dport))
			return -1;
	} else if (p->frag != LB_FRAG_LATER) {
		/* A later fragment has no L4 header: the first fragment's
		 * checksum covers the rest of the datagram. */
		if (l4_off > LB_MAX_L4_OFF)
			return -1;
		ports = data + l4_off;
		if (p->proto == IPPROTO_TCP) {
			struct tcphdr *tcp = data + l4_off;

			if ((void *)(tcp + 1) > data_end)
				return -1;
			l4sum = &tcp->check;
		} else {
			struct udphdr *udp = data + l4_off;

			if ((void *)(udp + 1) > data_end)
				return -1;
			l4sum = &udp->check;
		}
	}
	/* UDP may go without a checksum (zero); it must stay without one. */
	nosum = !l4sum || (p->proto == IPPROTO_UDP && *l4sum == 0);

	if (n->saddr != ip->saddr) {
		lb_csum_replace4(&ip->check, ip->saddr, n->saddr);
		if (!nosum)
			lb_csum_replace4(l4sum, ip->saddr, n->saddr);
		ip->saddr = n->saddr;
	}
	if (n->daddr != ip->daddr) {
		lb_csum_replace4(&ip->check, ip->daddr, n->daddr);
		if (!nosum)
			lb_csum_replace4(l4sum, ip->daddr, n->daddr);
		ip->daddr = n->daddr;
	}
	if (!ports || !l4sum)
		return 0;
	if (n->sport != ports[0]) {
		if (!nosum)
			lb_csum_replace2(l4sum, ports[0], n->sport);
		ports[0] = n->sport;
	}
	if (n->dport != ports[1]) {
		if (!nosum)
			lb_csum_replace2(l4sum, ports[1], n->dport);
		ports[1] = n->dport;
	}
	if (p->proto == IPPROTO_UDP && !nosum && *l4sum == 0)
		*l4sum = 0xffff;
	return 0;
}

/* The L4 sum through the helper (CHECKSUM_PARTIAL aware), then the IPv4
 * header by direct writes: the helper moved the packet, so the pointers are
 * read again. `src` picks the field. */
LB_INLINE int lb_store_addr(struct __sk_buff *skb, const struct lb_pkt *p,
			    int src, __u32 from, __u32 to, __u64 l4flags)
{
	struct iphdr *ip;

	if (from == to)
		return 0;
	/* A later fragment has no L4 header to fix; SCTP's sum has no addresses. */
	if (p->frag != LB_FRAG_LATER && p->proto != IPPROTO_SCTP &&
	    bpf_l4_csum_replace(skb, lb_l4_csum_off(p), from, to,
				l4flags | BPF_F_PSEUDO_HDR | sizeof(to)))
		return -1;
	ip = (void *)(long)skb->data + LB_ETH_LEN;
	if ((void *)(ip + 1) > (void *)(long)skb->data_end)
		return -1;
	lb_csum_replace4_kernel(&ip->check, from, to);
	if (src)
		ip->saddr = to;
	else
		ip->daddr = to;
	return 0;
}

LB_INLINE int lb_store_port(struct __sk_buff *skb, const struct lb_pkt *p,
			    __u32 off, __u16 from, __u16 to, __u64 l4flags)
{
	void *data;
	__u16 *port;

	if (from == to)
		return 0;
	if (p->proto == IPPROTO_SCTP || off > LB_MAX_L4_OFF + 2 ||
	    bpf_l4_csum_replace(skb, lb_l4_csum_off(p), from, to,
				l4flags | sizeof(to)))
		return -1;
	data = (void *)(long)skb->data;
	port = data + off;
	if ((void *)(port + 1) > (void *)(long)skb->data_end)
		return -1;
	*port = to;
	return 0;
}

LB_INLINE int lb_nat_skb(struct __sk_buff *skb, const struct lb_pkt *p,
			 const struct lb_nat *n)
{
	/* Leaves a zero UDP checksum alone and never produces one. */
	__u64 l4flags = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (lb_store_addr(skb, p, 1, p->saddr, n->saddr, l4flags) ||
	    lb_store_addr(skb, p, 0, p->daddr, n->daddr, l4flags))
		return -1;
	if (p->frag == LB_FRAG_LATER)
		return 0;
	if (lb_store_port(skb, p, p->l4_off, p->sport, n->sport, l4flags) ||
	    lb_store_port(skb, p, p->l4_off + 2, p->dport, n->dport, l4flags))
		return -1;
	return 0;
}

#endif
