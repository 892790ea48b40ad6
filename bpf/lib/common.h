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

/* Node-specific values come in as -D defines from loader/build.py; these
 * defaults keep the file compilable on its own. */
#ifndef LB_MAX_SERVICES
#define LB_MAX_SERVICES 65536
#endif
#ifndef LB_MAX_BACKENDS
#define LB_MAX_BACKENDS 65536
#endif
#ifndef LB_MAGLEV_SLOTS
#define LB_MAGLEV_SLOTS (1 << 22)
#endif
#ifndef LB_CT_SIZE
#define LB_CT_SIZE 262144
#endif
#ifndef LB_MAX_SOURCE_RANGES
#define LB_MAX_SOURCE_RANGES 16384
#endif
#ifndef LB_POL_MAX_ENDPOINTS
#define LB_POL_MAX_ENDPOINTS 4096
#endif
#ifndef LB_POL_IPCACHE_SIZE
#define LB_POL_IPCACHE_SIZE 262144
#endif
#ifndef LB_POL_RULES_SIZE
#define LB_POL_RULES_SIZE (1 << 20)
#endif
#ifndef LB_POL_PORTSETS
#define LB_POL_PORTSETS 65536
#endif
#ifndef LB_AFFINITY_SIZE
#define LB_AFFINITY_SIZE 65536
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

#endif
