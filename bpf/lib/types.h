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
#ifndef EQ_SLOTS
#error "EQ_SLOTS must be set by the loader"
#endif
#if EQ_SLOTS & (EQ_SLOTS - 1)
#error "EQ_SLOTS must be a power of two: slots are drawn with a mask"
#endif
/* log2(µs) latency buckets: bucket i holds [2^i, 2^(i+1)) µs, 0 holds [0, 2) */
#ifndef EQ_HIST_BUCKETS
#error "EQ_HIST_BUCKETS must be set by the loader"
#endif
#if EQ_HIST_BUCKETS & (EQ_HIST_BUCKETS - 1)
#error "EQ_HIST_BUCKETS must be a power of two: buckets are indexed with a mask"
#endif

/* Backend states (struct eq_backend.state). */
#define EQ_BE_UNUSED 0
#define EQ_BE_ACTIVE 1
#define EQ_BE_DRAINING 2     /* no new connections; existing ones untouched */
#define EQ_BE_QUARANTINED 3  /* no new connections; agent re-probes later */

/* eq_svc.flags */
#define EQ_SVC_P2C 1         /* weighted power of two choices: draw two slots, take the less loaded */
#define EQ_SVC_SWEEP 2       /* the first slot sweeps the table (eq_sweep_slot), not a random draw */

/* eq_budget.mode: what a connect over its caller's budget meets */
#define EQ_ENFORCE_OBSERVE 1  /* counted (observed), let through */
#define EQ_ENFORCE_THROTTLE 2 /* counted (throttled), refused: connect() fails with ECONNREFUSED */

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

/* A slot holds a backend id (low EQ_ID_BITS) and the slots that backend holds
 * in the same half (its share, above): the two-choice comparison reads both
 * from the slot it drew, and the agent writes ids and shares of a half in one
 * map update. EQ_NO_BACKEND (share 0xffff, more than EQ_SLOTS) is never a
 * packed value. */
#ifndef EQ_ID_BITS
#error "EQ_ID_BITS comes from the loader (-D, equilibriumd/datapath/constants.py)"
#endif
#define EQ_ID_MASK ((1u << EQ_ID_BITS) - 1)
#if EQ_MAX_BACKENDS > (1 << EQ_ID_BITS)
#error "backend ids must fit in EQ_ID_BITS: a slot packs id and share"
#endif
#if EQ_SLOTS >= 0xffff
#error "a share must be below 0xffff: EQ_NO_BACKEND is not a packed slot"
#endif

struct eq_table {            /* one half of a service's slot table, array eq_lb_slots[svc_id * 2 + gen]: */
    __u32 be[EQ_SLOTS];      /* per slot: backend id | share << EQ_ID_BITS; one map update writes a half */
};

struct eq_svc {              /* per service id, array eq_lb_svc */
    __u32 gen;               /* which half of the slot table is live (0/1) */
    __u32 n_avail;           /* backends holding slots; 0 => fail fast */
    __u32 n_backends;        /* configured backends (informational) */
    __u32 flags;             /* EQ_SVC_* */
};

struct eq_backend {          /* per backend id, array eq_lb_be */
    __u32 addr[4];           /* IPv4 in addr[0] */
    __u16 port;
    __u8 family;             /* 4 or 6 */
    __u8 state;              /* EQ_BE_* */
    __u32 svc;               /* owning service id: guards against stale slots */
    __u32 weight;            /* weight the agent last applied (informational) */
    __u32 gen;               /* bumped by the agent each time the id is handed to a new backend
                              * (and kept across updates and clears): a socket records it at
                              * connect, and its later events are not the new backend's */
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

/* Unconnected UDP: the reverse entries a socket created (eq_lb_revsk, keyed by
 * socket cookie), so that sock_release deletes them with the socket instead of
 * leaving them to the shared LRU (where a loop of short-lived sockets would evict
 * other sockets' live entries). A socket's first EQ_REVSK_N (backend) pairs are
 * recorded; entries past those are counted as untracked and left to the LRU. */
#define EQ_REVSK_N 4

struct eq_revsk_ent {
    __u32 addr[4];           /* backend address, as in the reverse key (IPv4 in [0]) */
    __u16 port;
    __u8 v6;                 /* 1: the key is in eq_lb6_rev, 0: eq_lb4_rev */
    __u8 used;
};

struct eq_revsk {
    struct eq_revsk_ent e[EQ_REVSK_N];
};

/* eq_rev_stat: per-CPU, one entry (eq_lb_rev_stat). Tracked entries live now:
 * inserted - released; evicted counts replies that would have shown the backend. */
struct eq_rev_stat {
    __u64 inserted;          /* tracked reverse entries created (a new (socket, backend) pair) */
    __u64 released;          /* tracked entries whose socket closed (sock_release deletes them) */
    __u64 evicted;           /* ... of which the LRU had already evicted (found missing at release) */
    __u64 untracked;         /* created past a socket's EQ_REVSK_N, or with eq_lb_revsk full: left to the LRU */
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

/* ---- telemetry ---------------------------------------------------------- */

/* eq_sock.flags */
#define EQ_SK_ESTABLISHED 1
#define EQ_SK_RST 2          /* a RST arrived (tracepoint tcp:tcp_receive_reset) */
#define EQ_SK_TRACKED 4      /* sockops saw the connect: it deletes the entry at TCP_CLOSE */
#define EQ_SK_COUNTED 8      /* counted in eq_lb_active: the first of close and release uncounts it */
#define EQ_SK_ABORTED 16     /* closed by the rebalancer (rebalance.bpf.c): a request it cut off is
                              * not counted against the backend */

struct eq_sock {             /* per translated socket, keyed by socket cookie (LRU) */
    __u32 fe_addr[4];        /* frontend the application asked for (IPv4 in [0]) */
    __u32 be_addr[4];        /* backend it was sent to */
    __u16 fe_port;
    __u16 be_port;
    __u32 backend;           /* backend id */
    __u32 svc;               /* service id */
    __u32 be_gen;            /* eq_backend.gen of its backend at connect: events of a socket whose
                              * id was since reused are dropped */
    __u64 flags;             /* EQ_SK_*; 64-bit: changed with atomics, and the kernel's
                              * BPF target (without alu32) has 64-bit fetch-and only */
    __u64 caller;            /* cgroup id of the process that called connect() */
    __u64 start_ns;          /* connect() time */
    __u64 req_ns;            /* first byte of the outstanding HTTP request; 0: none */
};

struct eq_be_tel {           /* per-CPU, per backend id: all monotonic counters */
    __u64 attempts;          /* TCP connects started (sockops TCP_CONNECT_CB) */
    __u64 established;
    __u64 refused;           /* SYN answered with RST */
    __u64 reset;             /* RST received after the handshake */
    __u64 timed_out;         /* SYN_SENT -> CLOSE without a RST: timed out or abandoned */
    __u64 closed;            /* established connections that closed */
    __u64 retrans;           /* segments retransmitted, added when a connection closes */
    __u64 bytes_sent;        /* bytes acked by the backend, added at close */
    __u64 bytes_recv;        /* bytes received from the backend, added at close */
    __u64 rtt_sum_us;        /* smoothed RTT samples (sockops RTT_CB), summed */
    __u64 rtt_samples;
    __u64 requests;          /* HTTP/1.x requests seen leaving */
    __u64 resp_1xx;
    __u64 resp_2xx;
    __u64 resp_3xx;
    __u64 resp_4xx;
    __u64 resp_5xx;
    __u64 req_errors;        /* connection closed with a request outstanding */
    __u64 conn_ns_sum;       /* connect latencies (one per established), summed: exact mean per tick */
    __u64 req_ns_sum;        /* request latencies (one per response counted in resp_*), summed */
    __u64 req_open;          /* sockets that came to have a request outstanding ... */
    __u64 req_done;          /* ... and that stopped having one (answered, or closed unanswered):
                              * in flight = open - done, a gauge of live sockets only */
};

#ifndef EQ_TEL_GROUP
#error "EQ_TEL_GROUP must be set by the loader"
#endif
#if EQ_TEL_GROUP & (EQ_TEL_GROUP - 1)
#error "EQ_TEL_GROUP must be a power of two"
#endif

/* per-CPU, the counters of EQ_TEL_GROUP consecutive backend ids in one value of
 * eq_tel_be (key = id / EQ_TEL_GROUP): the agent's tick reads every backend's
 * counters, and a batch read costs per key, not per byte. */
struct eq_tel_group {
    struct eq_be_tel be[EQ_TEL_GROUP];
};

/* per backend id (shared, atomic adds): latency histograms, apart from the counters because
 * only scrapes and equilibriumctl read them; the agent's tick reads the counters
 * alone (176 of 432 bytes per backend and CPU). */
struct eq_be_hist {
    __u32 conn_hist[EQ_HIST_BUCKETS];  /* connect latency */
    __u32 req_hist[EQ_HIST_BUCKETS];   /* request first byte -> response first byte */
};

struct eq_caller_key {       /* per (caller cgroup, service) */
    __u64 cgroup;
    __u32 svc;
    __u32 pad;
};

/* A caller's admission budget for one service (key: struct eq_caller_key), written
 * by the agent only for callers it punishes (folk-theorem trigger): everyone else
 * has none and is never held back. A virtual-scheduling rate limit (GCRA): `tat`
 * is when the caller's next connect is due at its rate; a connect may come at most
 * `burst_ns` early. Updated without atomics: concurrent connects from several CPUs
 * may each pass on the same credit, a small overshoot a budget tolerates. */
struct eq_budget {
    __u64 tat;               /* theoretical arrival time, ns (CLOCK_MONOTONIC) */
    __u64 interval_ns;       /* 1e9 / allowed connects per second */
    __u64 burst_ns;          /* how far ahead of schedule a connect may be */
    __u64 throttled;         /* connects refused (mode throttle) */
    __u64 observed;          /* connects over budget let through (mode observe) */
    __u64 admitted;          /* connects within budget */
    __u32 mode;              /* EQ_ENFORCE_* */
    __u32 pad;
};

struct eq_caller_val {       /* per-CPU */
    __u64 connections;
    __u64 requests;
    __u64 errors;            /* refused, reset, timed out, or closed before a response */
};

/* Evidence per (caller cgroup, backend): the same observations as eq_be_tel,
 * attributed to the cgroup whose process made the connection, so the agent can
 * judge a backend by what its callers corroborate, not by what one caller
 * produces (aborted connects, requests it never waits for). Each backend has
 * EQ_CB_SLOTS caller slots; a caller takes a free slot or one idle for
 * EQ_CB_STALE_NS. Counts decay: halved every 2^EQ_CB_HALF_SHIFT ns (lazily, at
 * the next update; the agent applies the pending halvings when it reads), so a
 * slot holds the last ~second of its caller's traffic. Shared between CPUs
 * (atomic adds) and mmapable: the agent reads it without a syscall. */
#ifndef EQ_CB_SLOTS
#error "EQ_CB_SLOTS must be set by the loader"
#endif

struct eq_cb_slot {
    __u64 cgroup;            /* bpf_get_current_cgroup_id() at connect(); 0: free */
    __u64 last_ns;           /* decay reference: counts are as of this time */
    __u64 attempts;          /* named as in eq_be_tel */
    __u64 established;
    __u64 refused;
    __u64 reset;
    __u64 timed_out;
    __u64 requests;
    __u64 responses;         /* status lines of classes 1-5 (each one timed) */
    __u64 resp_5xx;
    __u64 req_errors;
    __u64 conn_ns_sum;
    __u64 req_ns_sum;
};

struct eq_cb {               /* per backend id */
    struct eq_cb_slot slot[EQ_CB_SLOTS];
};

/* ---- connection rebalancing (bpf/rebalance.bpf.c) ------------------------ */

/* Why the rebalancer closed a connection: an index of eq_rb_closed.n. */
#define EQ_RB_EXCESS 0       /* its backend holds more of the service's connections than its share */
#define EQ_RB_DRAIN 1        /* its backend is draining, quarantined or removed */
#define EQ_RB_AGE 2          /* older than the service's max connection age */
#define EQ_RB_REASONS 3

#define EQ_RB_IDLE 1         /* eq_rb_svc.flags: close idle connections for excess and drain (mode idle) */

struct eq_rb_svc {           /* per service id, written by the agent before each walk */
    __s64 budget;            /* closes left in this walk (all reasons); <= 0: leave the service alone */
    __u64 min_age_ns;        /* a connection younger than this is never closed for excess or drain */
    __u64 min_idle_ns;       /* nor one with traffic this recently */
    __u64 max_age_ns;        /* 0: none; else close at this age, idle or not */
    __u64 flags;             /* EQ_RB_*: without EQ_RB_IDLE only max_age_ns closes (mode off) */
};

/* Per backend id (array eq_rb_closed), apart from the quotas (eq_rb_quota: an
 * __s64 per backend id the agent overwrites): connections closed, by reason. */
struct eq_rb_closed {
    __u64 n[EQ_RB_REASONS];
    __u64 pad;
};

#endif /* EQ_TYPES_H */
