/* Header parsing with every bound checked before it is read. */
#ifndef LB_PARSE_H
#define LB_PARSE_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#include "../lb_maps.h"
#include "common.h"

/* Header lengths and offsets (an Ethernet frame with IPv4 inside). */
#define LB_ETH_LEN     14
#define LB_IPV4_HLEN   20 /* without options */
#define LB_MAX_L4_OFF  (LB_ETH_LEN + 60)
#define LB_IP_CSUM_OFF (LB_ETH_LEN + 10)
/* What the programs read of an skb must sit in its linear part: the
 * largest IPv4 and TCP headers, or an ICMP error quoting the largest IPv4
 * header and 18 bytes of TCP (its checksum; lib/icmp.h). */
#define LB_PULL_LEN    (LB_MAX_L4_OFF + 8 + 60 + 18)

#define LB_SCTP_HLEN   12

#define LB_IP_DF     0x4000
#define LB_IP_MF     0x2000
#define LB_IP_OFFSET 0x1fff

#define LB_TCP_FIN 0x01
#define LB_TCP_SYN 0x02
#define LB_TCP_RST 0x04
#define LB_TCP_ACK 0x10

/* lb_pkt.frag: where a packet sits in a fragmented datagram. */
#define LB_FRAG_NONE  0
#define LB_FRAG_FIRST 1 /* offset 0, more to come: it has the L4 header */
#define LB_FRAG_LATER 2 /* no L4 header: ports from lib/frag.h */

/* What the programs need of a packet: offsets (valid for XDP and tc alike)
 * and the 5-tuple in network order. */
struct lb_pkt {
	__u32 l3_off;
	__u32 l4_off;
	__u32 len;
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8  proto;
	__u8  tcp_flags;
	__u16 ip_id;
	__u8  frag;
	__u8  df;  /* don't fragment: a router must answer "fragmentation needed" */
	__u8  pad[2];
};

/* Parse Ethernet / IPv4 / TCP, UDP or SCTP. Returns -1 on success, otherwise the
 * LB_STAT_* reason that decides the packet (pass or drop) untouched.
 * A header that is cut short or inconsistent is malformed; what is well
 * formed but not ours (not IPv4, other protocols) passes. A later fragment
 * of TCP or UDP parses with its ports zero and frag LB_FRAG_LATER: its
 * ports are its first fragment's (lib/frag.h).
 * Headers must lie in [data, data_end); `len` is the whole packet, which on
 * an skb may reach past the linear part into pages the program cannot read. */
LB_INLINE int lb_parse(void *data, void *data_end, __u32 len, struct lb_pkt *p)
{
	struct ethhdr *eth = data;
	struct iphdr *ip;
	__u32 ihl_len, tot_len;
	void *l4;

	p->len = len;
	if ((void *)(eth + 1) > data_end)
		return LB_STAT_DROP_MALFORMED;
	/* IPv6 keeps its own maps and parser when it comes; only the
	 * ethertype switch here needs to grow. */
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return LB_STAT_PASS_NOT_IP;

	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return LB_STAT_DROP_MALFORMED;
	if (ip->version != 4 || ip->ihl < 5)
		return LB_STAT_DROP_MALFORMED;
	ihl_len = ip->ihl * 4;
	tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < ihl_len || sizeof(*eth) + tot_len > len)
		return LB_STAT_DROP_MALFORMED;

	p->l3_off = sizeof(*eth);
	p->l4_off = sizeof(*eth) + ihl_len;
	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->proto = ip->protocol;
	p->sport = 0;
	p->dport = 0;
	p->tcp_flags = 0;
	p->ip_id = ip->id;
	p->frag = LB_FRAG_NONE;
	p->df = !!(ip->frag_off & bpf_htons(LB_IP_DF));

	if (ip->frag_off & bpf_htons(LB_IP_OFFSET)) {
		if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP &&
		    ip->protocol != IPPROTO_SCTP)
			return LB_STAT_PASS_FRAGMENT;
		p->frag = LB_FRAG_LATER;
		return -1;
	}
	if (ip->frag_off & bpf_htons(LB_IP_MF))
		p->frag = LB_FRAG_FIRST;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP &&
	    ip->protocol != IPPROTO_SCTP)
		return LB_STAT_PASS_OTHER_PROTO;

	/* TCP and UDP (and SCTP) open with the two ports: read them behind one
	 * bound, so the compiler has no tail to merge the branches into. */
	l4 = (void *)ip + ihl_len;
	if (l4 + sizeof(struct udphdr) > data_end)
		return LB_STAT_DROP_MALFORMED;
	p->sport = ((struct udphdr *)l4)->source;
	p->dport = ((struct udphdr *)l4)->dest;
	/* SCTP's common header is 12 bytes: ports, verification tag, CRC32c. */
	if (ip->protocol == IPPROTO_SCTP) {
		if (l4 + LB_SCTP_HLEN > data_end || tot_len - ihl_len < LB_SCTP_HLEN)
			return LB_STAT_DROP_MALFORMED;
		return -1;
	}
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;

		if ((void *)(tcp + 1) > data_end || tcp->doff < 5 ||
		    tcp->doff * 4 > tot_len - ihl_len)
			return LB_STAT_DROP_MALFORMED;
		p->tcp_flags = ((__u8 *)tcp)[13];
	} else {
		struct udphdr *udp = l4;

		/* A first fragment holds only the start of what udp->len counts. */
		if (bpf_ntohs(udp->len) < sizeof(*udp) ||
		    (p->frag == LB_FRAG_NONE && bpf_ntohs(udp->len) > tot_len - ihl_len))
			return LB_STAT_DROP_MALFORMED;
	}
	return -1;
}

/* tc: make the headers readable (see LB_PULL_LEN) and give the bounds of
 * the linear part, which a pull moves. */
LB_INLINE void lb_pull(struct __sk_buff *skb, void **data, void **data_end)
{
	*data = (void *)(long)skb->data;
	*data_end = (void *)(long)skb->data_end;
	if (*data + LB_PULL_LEN > *data_end && skb->len > *data_end - *data) {
		bpf_skb_pull_data(skb, skb->len < LB_PULL_LEN ? skb->len : LB_PULL_LEN);
		*data = (void *)(long)skb->data;
		*data_end = (void *)(long)skb->data_end;
	}
}

#endif
