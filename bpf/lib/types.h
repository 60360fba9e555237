/* Structs shared between the BPF programs and the agent.
 *
 * Every struct here has a Python mirror in equilibriumd/datapath/structs.py
 * ("must match struct X in bpf/lib/types.h"); tests/datapath/test_structs.py
 * checks sizes and offsets against what the compiler built. Padding is
 * explicit so both sides agree without relying on compiler rules.
 *
 * Byte order: addresses and ports are kept in network order, exactly as the
 * kernel hands them to cgroup sock_addr programs, so the hot path never swaps.
 */
#ifndef EQ_TYPES_H
#define EQ_TYPES_H

/* Sizes and names come from equilibriumd/datapath/constants.py as -D flags. */
#ifndef EQ_MAX_SERVICES
#error "EQ_MAX_SERVICES must be set by the loader"
#endif

/* Backend states (struct eq_backend.state). */
#define EQ_BE_UNUSED 0
#define EQ_BE_ACTIVE 1
#define EQ_BE_DRAINING 2     /* no new connections; existing ones untouched */
#define EQ_BE_QUARANTINED 3  /* no new connections; agent re-probes later */

/* Slot value meaning "no backend": the table of a service with nothing available. */
#define EQ_NO_BACKEND 0xffffffffu

struct eq_fe4_key {          /* frontend lookup, IPv4 */
    __u32 addr;              /* network order */
    __u16 port;              /* network order */
    __u8 proto;              /* IPPROTO_TCP / IPPROTO_UDP */
    __u8 pad;
};

struct eq_fe6_key {          /* frontend lookup, IPv6 */
    __u32 addr[4];
    __u16 port;
    __u8 proto;
    __u8 pad;
};

struct eq_svc {              /* per service id, array eq_lb_svc */
    __u32 gen;               /* which half of the slot table is live (0/1) */
    __u32 n_avail;           /* backends holding slots; 0 => fail fast */
    __u32 n_backends;        /* configured backends (informational) */
    __u32 flags;
};

struct eq_backend {          /* per backend id, array eq_lb_be */
    __u32 addr[4];           /* IPv4 in addr[0] */
    __u16 port;
    __u8 family;             /* 4 or 6 */
    __u8 state;              /* EQ_BE_* */
    __u32 svc;               /* owning service id: guards against stale slots */
    __u32 weight;            /* weight the agent last applied (informational) */
    __u32 pad;
};

struct eq_rev4_key {         /* reverse translation, keyed by socket and backend */
    __u64 cookie;
    __u32 addr;
    __u16 port;
    __u16 pad;
};

struct eq_rev4_val {
    __u32 addr;
    __u16 port;
    __u16 pad;
};

struct eq_rev6_key {
    __u64 cookie;
    __u32 addr[4];
    __u16 port;
    __u16 pad[3];
};

struct eq_rev6_val {
    __u32 addr[4];
    __u16 port;
    __u16 pad;
};

struct eq_be_stats {         /* per-CPU, per backend id */
    __u64 selections;
};

struct eq_svc_errs {         /* per-CPU, per service id: translation failures by reason */
    __u64 no_backend;        /* nothing available: connect failed with EHOSTUNREACH */
    __u64 stale_slot;        /* slot pointed at a backend no longer active */
    __u64 rev_update;        /* reverse-translation map update failed */
};

struct eq_svc_name {         /* per service id; read by equilibriumctl, not by programs */
    char name[64];
};

struct eq_meta {             /* single entry: what the loader built */
    __u64 source_hash;       /* hash of sources and -D flags */
    __u32 layout;            /* EQ_LAYOUT_VERSION */
    __u32 pad;
};

#endif /* EQ_TYPES_H */
