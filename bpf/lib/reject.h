/* REJECT as kube-proxy does it: an ICMP port-unreachable back to the
 * client, so it sees "connection refused" at once instead of a timeout.
 * The reply quotes the offending IP header and the first 8 bytes of its
 * payload (RFC 792). Packets with IP options are dropped instead: quoting
 * them would make the reply's length variable for no practical gain. */
#ifndef LB_REJECT_H
#define LB_REJECT_H

#include "common.h"
#include "csum.h"
#include "parse.h"

#define LB_ICMP_HDRS   28 /* the reply's IPv4 and ICMP headers */
#define LB_QUOTE_LEN   28 /* quoted IPv4 header (no options) + 8 bytes */
#define LB_REJECT_LEN  (14 + LB_ICMP_HDRS + LB_QUOTE_LEN)

struct lb_icmp_reply {
	struct iphdr ip;
	__u8  type;
	__u8  code;
	__u16 check;
	__u32 unused;
	__u8  quote[LB_QUOTE_LEN];
};

LB_INLINE __u16 lb_csum_buf(void *buf, int len)
{
	return ~lb_csum_fold(bpf_csum_diff(0, 0, buf, len, 0));
}

/* Fill the reply headers in `r` (whose quote is already in place). */
LB_INLINE void lb_icmp_fill(struct lb_icmp_reply *r, const struct lb_pkt *p)
{
	r->ip.version = 4;
	r->ip.ihl = 5;
	r->ip.tos = 0;
	r->ip.tot_len = bpf_htons(LB_ICMP_HDRS + LB_QUOTE_LEN);
	r->ip.id = 0;
	r->ip.frag_off = 0;
	r->ip.ttl = 64;
	r->ip.protocol = IPPROTO_ICMP;
	r->ip.check = 0;
	r->ip.saddr = p->daddr;
	r->ip.daddr = p->saddr;
	r->type = 3; /* destination unreachable */
	r->code = 3; /* port unreachable */
	r->check = 0;
	r->unused = 0;
	r->ip.check = lb_csum_buf(&r->ip, sizeof(r->ip));
	r->check = lb_csum_buf(&r->type, 8 + LB_QUOTE_LEN);
}

/* XDP: build the reply in place and send it back out (XDP_TX). */
LB_INLINE int lb_reject_xdp(struct xdp_md *ctx, const struct lb_pkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct lb_icmp_reply r;
	struct ethhdr eth;

	if (p->l4_off != 14 + 20 || data + 14 + LB_QUOTE_LEN > data_end)
		return -1;
	__builtin_memcpy(&eth, data, sizeof(eth));
	__builtin_memcpy(r.quote, data + 14, LB_QUOTE_LEN);
	lb_icmp_fill(&r, p);
	/* Room for the new headers in front; then cut what is not quoted. */
	if (bpf_xdp_adjust_head(ctx, -LB_ICMP_HDRS))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + LB_REJECT_LEN > data_end)
		return -1;
	if (bpf_xdp_adjust_tail(ctx, LB_REJECT_LEN - (int)(data_end - data)))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + LB_REJECT_LEN > data_end)
		return -1;
	__builtin_memcpy(((struct ethhdr *)data)->h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(((struct ethhdr *)data)->h_source, eth.h_dest, ETH_ALEN);
	((struct ethhdr *)data)->h_proto = bpf_htons(ETH_P_IP);
	__builtin_memcpy(data + 14, &r, sizeof(r));
	return 0;
}

/* tc: reshape the skb into the reply and send it back where it came from. */
LB_INLINE int lb_reject_skb(struct __sk_buff *skb, const struct lb_pkt *p)
{
	struct lb_icmp_reply r;
	struct ethhdr eth;
	__u8 mac[ETH_ALEN];

	if (p->l4_off != 14 + 20)
		return -1;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) ||
	    bpf_skb_load_bytes(skb, 14, r.quote, LB_QUOTE_LEN))
		return -1;
	lb_icmp_fill(&r, p);
	if (bpf_skb_change_tail(skb, 14 + LB_QUOTE_LEN, 0) ||
	    bpf_skb_adjust_room(skb, LB_ICMP_HDRS, BPF_ADJ_ROOM_MAC, 0))
		return -1;
	__builtin_memcpy(mac, eth.h_dest, ETH_ALEN);
	__builtin_memcpy(eth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(eth.h_source, mac, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) ||
	    bpf_skb_store_bytes(skb, 14, &r, sizeof(r), 0))
		return -1;
	return 0;
}

#endif
