/* Socket-level load balancing for the node's own processes and hostNetwork
 * pods: a ClusterIP is translated when the socket connects (TCP, connected
 * UDP) or sends (unconnected UDP), so their packets need no per-packet NAT.
 * Replies on unconnected UDP sockets get the service address back in
 * recvmsg. Only sockets of the node's network namespace are touched. */
#ifndef LB_SOCK_H
#define LB_SOCK_H

#include "common.h"
#include "maps.h"
#include "lb.h"

LB_INLINE int lb_sock_ours(struct bpf_sock_addr *ctx)
{
	struct lb_config *cfg = lb_cfg();

	return cfg && cfg->netns_cookie && cfg->netns_cookie == bpf_get_netns_cookie(ctx);
}

/* Translate the destination of ctx to a backend. Returns 1 to let the call
 * go on, 0 to refuse it (a service without endpoints: the caller gets EPERM
 * at once rather than a timeout). */
LB_INLINE int lb_sock_translate(struct bpf_sock_addr *ctx, int remember)
{
	struct lb_pkt p = {};
	struct lb_svc_val *svc;
	struct lb_backend *b;
	__u32 id;

	if (!lb_sock_ours(ctx))
		return 1;
	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return 1;
	p.daddr = ctx->user_ip4;
	p.dport = (__u16)ctx->user_port;
	p.proto = ctx->protocol;
	svc = lb_service(&p, LB_SCOPE_INTERNAL);
	if (!svc)
		return 1;
	if (svc->maglev_size == 0)
		return 0;
	/* No 5-tuple exists yet: spread by a random hash, as a new flow would. */
	id = lb_maglev_pick(svc, bpf_get_prandom_u32());
	b = lb_backend(id);
	if (!b)
		return 0;
	if (remember) {
		struct lb_sock_rev_key k = {
			.cookie = bpf_get_socket_cookie(ctx),
			.addr = b->addr,
			.port = b->port,
		};
		struct lb_sock_rev_val v = { .addr = p.daddr, .port = p.dport };

		lb_sock_rev.update(&k, &v);
	}
	ctx->user_ip4 = b->addr;
	ctx->user_port = b->port;
	return 1;
}

/* recvmsg on a UDP socket: a reply from a backend reads as the service. */
LB_INLINE int lb_sock_reverse(struct bpf_sock_addr *ctx)
{
	struct lb_sock_rev_key k = {};
	struct lb_sock_rev_val *v;

	if (!lb_sock_ours(ctx))
		return 1;
	k.cookie = bpf_get_socket_cookie(ctx);
	k.addr = ctx->user_ip4;
	k.port = (__u16)ctx->user_port;
	v = lb_sock_rev.lookup(&k);
	if (v) {
		ctx->user_ip4 = v->addr;
		ctx->user_port = v->port;
	}
	return 1;
}

#endif
