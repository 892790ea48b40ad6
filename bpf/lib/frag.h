/* IPv4 fragments: only a datagram's first fragment carries its ports. They
 * are kept for the later fragments, which then meet the same conntrack
 * entry, translation and policy as the first, as Cilium's fragment tracking
 * does (bpf/lib/ipv4.h, ipv4_handle_fragmentation, over the map
 * cilium_ipv4_frag_datagrams). A later fragment whose first was not seen
 * here (reordered, or sent another way) passes untouched: alone it cannot
 * be reassembled into anything. */
#ifndef LB_FRAG_H
#define LB_FRAG_H

#include "common.h"
#include "maps.h"
#include "parse.h"

/* Returns -1 when the packet is whole or its ports are known, else
 * LB_STAT_PASS_FRAG_NO_FIRST (counted apart: reordering, or a path that
 * splits a datagram's fragments). */
LB_INLINE int lb_frag_ports(struct lb_pkt *p)
{
	struct lb_frag_key k = {
		.saddr = p->saddr,
		.daddr = p->daddr,
		.id = p->ip_id,
		.proto = p->proto,
	};
	struct lb_frag_val *v, ports = {};

	if (p->frag == LB_FRAG_FIRST) {
		ports.sport = p->sport;
		ports.dport = p->dport;
		lb_frags.update(&k, &ports);
		return -1;
	}
	if (p->frag != LB_FRAG_LATER)
		return -1;
	v = lb_frags.lookup(&k);
	if (!v)
		return LB_STAT_PASS_FRAG_NO_FIRST;
	p->sport = v->sport;
	p->dport = v->dport;
	return -1;
}

/* lb_parse, then a later fragment's ports: -1 when p is a TCP or UDP packet
 * with known ports, else the stat reason lb_parse or lb_frag_ports gave. */
LB_INLINE int lb_parse_ports(void *data, void *data_end, __u32 len, struct lb_pkt *p)
{
	int reason = lb_parse(data, data_end, len, p);

	return reason == -1 ? lb_frag_ports(p) : reason;
}

#endif
