/* Small things every datapath file needs. */
#ifndef LB_COMMON_H
#define LB_COMMON_H

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

#define LB_INLINE static __always_inline

#ifndef offsetof
#define offsetof(t, m) __builtin_offsetof(t, m)
#endif

#define LB_NSEC_PER_SEC 1000000000ULL

/* Map sizes come in as -D defines from loader/sizes.py, their only
 * definition. */
#ifndef LB_MAX_SERVICES
#error "LB_MAX_SERVICES: a -D define of loader/sizes.py"
#endif
#ifndef LB_MAX_BACKENDS
#error "LB_MAX_BACKENDS: a -D define of loader/sizes.py"
#endif
#ifndef LB_MAGLEV_SLOTS
#error "LB_MAGLEV_SLOTS: a -D define of loader/sizes.py"
#endif
#ifndef LB_CT_SIZE
#error "LB_CT_SIZE: a -D define of loader/sizes.py"
#endif
#ifndef LB_MAX_SOURCE_RANGES
#error "LB_MAX_SOURCE_RANGES: a -D define of loader/sizes.py"
#endif
#ifndef LB_POL_MAX_ENDPOINTS
#error "LB_POL_MAX_ENDPOINTS: a -D define of loader/sizes.py"
#endif
#ifndef LB_POL_IPCACHE_SIZE
#error "LB_POL_IPCACHE_SIZE: a -D define of loader/sizes.py"
#endif
#ifndef LB_POL_RULES_SIZE
#error "LB_POL_RULES_SIZE: a -D define of loader/sizes.py"
#endif
#ifndef LB_POL_PORTSETS
#error "LB_POL_PORTSETS: a -D define of loader/sizes.py"
#endif
#ifndef LB_FILTER_WORDS
#error "LB_FILTER_WORDS: a -D define of loader/sizes.py"
#endif
#ifndef LB_AFFINITY_SIZE
#error "LB_AFFINITY_SIZE: a -D define of loader/sizes.py"
#endif
/* Connection-tracking lifetimes, as Cilium's defaults: established TCP 6 h,
 * TCP not yet answered 60 s, TCP after FIN or RST 10 s, everything else 60 s
 * of silence. */
#ifndef LB_CT_TCP_SYN_S
#define LB_CT_TCP_SYN_S 60
#endif
#ifndef LB_CT_TCP_LIFETIME_S
#define LB_CT_TCP_LIFETIME_S 21600
#endif
#ifndef LB_CT_TCP_CLOSING_S
#define LB_CT_TCP_CLOSING_S 10
#endif
#ifndef LB_CT_OTHER_LIFETIME_S
#define LB_CT_OTHER_LIFETIME_S 60
#endif
#ifndef LB_PIN_DIR
#define LB_PIN_DIR "/sys/fs/bpf/lb"
#endif

/* The datapath's clock: jiffies in nanoseconds. Lifetimes are seconds, and
 * the JIT inlines bpf_jiffies64 (1 ns here) where bpf_ktime_get_coarse_ns
 * costs 21 and bpf_ktime_get_ns 37 (bench/NOTES.md). Cilium's conntrack
 * reads jiffies too (bpf/lib/time.h, bpf_mono_now). The loader measures the
 * tick (loader/clock.py); userspace ages entries by the same clock. */
#ifndef LB_NSEC_PER_JIFFY
#error "LB_NSEC_PER_JIFFY must come from the loader (loader/clock.py)"
#endif
#define lb_now() (bpf_jiffies64() * LB_NSEC_PER_JIFFY)

#endif
