/* Path MTU of what XDP translates. The kernel answers a packet it cannot
 * forward without fragmenting, when the sender forbade that (DF), with
 * "fragmentation needed" to the packet's source (ip_forward() in
 * net/ipv4/ip_forward.c). After translation that source is no longer the
 * sender: the node itself for a masqueraded flow, the frontend for a reply.
 * The sender never hears of it and its connection stalls on the first
 * full-size segment. So the route's MTU is looked up here, for the
 * translated addresses, and the error goes to the sender quoting what it
 * sent (lib/reject.h), as a router on its path would answer.
 * Only a packet longer than the smallest MTU of the node's devices can be
 * too big: the others, and all of them while that MTU is not known, skip
 * the lookup. */
#ifndef LB_PMTU_H
#define LB_PMTU_H

#include <uapi/linux/bpf.h>

#include "common.h"
#include "maps.h"
#include "nat.h"
#include "parse.h"

#define LB_AF_INET 2

/* The MTU of the translated packet's route when the packet is too big for
 * it, else 0. */
LB_INLINE __u32 lb_path_mtu_xdp(struct xdp_md *ctx, const struct lb_pkt *p,
				const struct lb_nat *n, const struct lb_config *cfg)
{
	struct bpf_fib_lookup fib = {};
	__u32 tot_len = p->len - p->l3_off, in_mtu = 0;

	if (!p->df || p->frag != LB_FRAG_NONE)
		return 0;
	if (!cfg || !cfg->min_mtu || tot_len <= cfg->min_mtu)
		return 0;
	/* Longer than the device it came in on: an aggregate of generic XDP
	 * (GRO), which the kernel segments to fit on its way out. */
	if (bpf_check_mtu(ctx, 0, &in_mtu, 0, 0))
		return 0;
	fib.family = LB_AF_INET;
	fib.l4_protocol = p->proto;
	fib.sport = n->sport;
	fib.dport = n->dport;
	fib.tot_len = tot_len;
	fib.ifindex = ctx->ingress_ifindex;
	fib.ipv4_src = n->saddr;
	fib.ipv4_dst = n->daddr;
	if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return 0;
	return fib.mtu_result;
}

#endif
