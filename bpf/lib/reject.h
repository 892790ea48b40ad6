/* REJECT as kube-proxy does it: an ICMP port-unreachable back to the
 * client, so it sees "connection refused" at once instead of a timeout.
 * At XDP also "fragmentation needed" with the route's MTU, for a packet
 * too big to forward once translated (lib/pmtu.h).
 * The reply quotes the offending IP header and the start of its payload:
 * 8 bytes for UDP (RFC 792's minimum), the whole 20-byte TCP header for TCP,
 * because an skb whose TCP checksum is still to be filled in (CHECKSUM_PARTIAL,
 * as a local socket sends it) cannot be cut short of that field.
 * Packets with IP options are dropped instead: quoting them would make the
 * reply's layout variable for no practical gain. */
#ifndef LB_REJECT_H
#define LB_REJECT_H

#include <uapi/linux/icmp.h>

#include "common.h"
#include "csum.h"
#include "parse.h"

#define LB_ICMP_HDRS   28 /* the reply's IPv4 and ICMP headers */
#define LB_QUOTE_UDP   28 /* quoted IPv4 header (no options) + 8 bytes */
#define LB_QUOTE_TCP   40 /* quoted IPv4 header + 20-byte TCP header */

struct lb_icmp_reply {
	struct iphdr ip;
	__u8  type;
	__u8  code;
	__u16 check;
	__u32 unused;
	__u8  quote[LB_QUOTE_TCP];
};

LB_INLINE __u16 lb_csum_buf(void *buf, int len)
{
	return ~lb_csum_fold(bpf_csum_diff(0, 0, buf, len, 0));
}

/* Fill the reply headers in `r` (whose quote is already in place): port
 * unreachable, or fragmentation needed when `mtu` is given (RFC 1191: the
 * next-hop MTU in the low 16 bits of the second word).
 * `qlen` is a constant at every call, which keeps the verifier's sizes exact. */
LB_INLINE void lb_icmp_fill(struct lb_icmp_reply *r, const struct lb_pkt *p,
			    const int qlen, __u32 mtu)
{
	r->ip.version = 4;
	r->ip.ihl = 5;
	r->ip.tos = 0;
	r->ip.tot_len = bpf_htons(LB_ICMP_HDRS + qlen);
	r->ip.id = 0;
	r->ip.frag_off = 0;
	r->ip.ttl = 64;
	r->ip.protocol = IPPROTO_ICMP;
	r->ip.check = 0;
	r->ip.saddr = p->daddr;
	r->ip.daddr = p->saddr;
	r->type = 3; /* destination unreachable */
	r->code = mtu ? 4 : 3; /* fragmentation needed : port unreachable */
	r->check = 0;
	r->unused = bpf_htonl(mtu & 0xffff);
	r->ip.check = lb_csum_buf(&r->ip, sizeof(r->ip));
	r->check = lb_csum_buf(&r->type, 8 + qlen);
}

/* XDP: build the reply in place and send it back out (XDP_TX). */
LB_INLINE int lb_reject_xdp_q(struct xdp_md *ctx, const struct lb_pkt *p,
			      const int qlen, __u32 mtu)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct lb_icmp_reply r;
	struct ethhdr eth;

	if (p->l4_off != LB_ETH_LEN + LB_IPV4_HLEN || data + LB_ETH_LEN + qlen > data_end)
		return -1;
	__builtin_memcpy(&eth, data, sizeof(eth));
	__builtin_memcpy(r.quote, data + LB_ETH_LEN, qlen);
	lb_icmp_fill(&r, p, qlen, mtu);
	/* Room for the new headers in front; then cut what is not quoted. */
	if (bpf_xdp_adjust_head(ctx, -LB_ICMP_HDRS))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + LB_ETH_LEN + LB_ICMP_HDRS + qlen > data_end)
		return -1;
	if (bpf_xdp_adjust_tail(ctx, LB_ETH_LEN + LB_ICMP_HDRS + qlen - (int)(data_end - data)))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + LB_ETH_LEN + LB_ICMP_HDRS + qlen > data_end)
		return -1;
	__builtin_memcpy(((struct ethhdr *)data)->h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(((struct ethhdr *)data)->h_source, eth.h_dest, ETH_ALEN);
	((struct ethhdr *)data)->h_proto = bpf_htons(ETH_P_IP);
	__builtin_memcpy(data + LB_ETH_LEN, &r, LB_ICMP_HDRS + qlen);
	return 0;
}

LB_INLINE int lb_reject_xdp(struct xdp_md *ctx, const struct lb_pkt *p, __u32 mtu)
{
	if (p->proto == IPPROTO_TCP)
		return lb_reject_xdp_q(ctx, p, LB_QUOTE_TCP, mtu);
	return lb_reject_xdp_q(ctx, p, LB_QUOTE_UDP, mtu);
}

/* tc: reshape the skb into the reply and send it back where it came from. */
LB_INLINE int lb_reject_skb_q(struct __sk_buff *skb, const struct lb_pkt *p,
			      const int qlen)
{
	struct lb_icmp_reply r;
	struct ethhdr eth;
	__u8 mac[ETH_ALEN];

	if (p->l4_off != LB_ETH_LEN + LB_IPV4_HLEN)
		return -1;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) ||
	    bpf_skb_load_bytes(skb, LB_ETH_LEN, r.quote, qlen))
		return -1;
	lb_icmp_fill(&r, p, qlen, 0);
	if (bpf_skb_change_tail(skb, LB_ETH_LEN + qlen, 0) ||
	    bpf_skb_adjust_room(skb, LB_ICMP_HDRS, BPF_ADJ_ROOM_MAC, 0))
		return -1;
	__builtin_memcpy(mac, eth.h_dest, ETH_ALEN);
	__builtin_memcpy(eth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(eth.h_source, mac, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) ||
	    bpf_skb_store_bytes(skb, LB_ETH_LEN, &r, LB_ICMP_HDRS + qlen, 0))
		return -1;
	return 0;
}

LB_INLINE int lb_reject_skb(struct __sk_buff *skb, const struct lb_pkt *p)
{
	if (p->proto == IPPROTO_TCP)
		return lb_reject_skb_q(skb, p, LB_QUOTE_TCP);
	return lb_reject_skb_q(skb, p, LB_QUOTE_UDP);
}

#endif
