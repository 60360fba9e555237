/* Telemetry: per-backend TCP and HTTP/1.x counters, per-caller counts.
 *
 * Every socket that connect4 translated has an eq_tel_sock entry (keyed by
 * socket cookie) naming its backend, service and caller. From there:
 *   sockops          connect attempts, connect latency, established, closes,
 *                    failures by kind, smoothed RTT (at close), retransmits, bytes
 *   cgroup_skb       HTTP/1.x requests leaving (egress) and status lines
 *                    arriving (ingress): status classes, time to first byte
 *   tracepoint       tcp:tcp_receive_reset marks a socket as reset, so a
 *                    SYN_SENT -> CLOSE is told apart as refused or timed out
 * The same observations go to eq_tel_cb per (caller cgroup, backend): the
 * agent weighs callers' evidence against each other (policy/evidence.py).
 * The per-backend counters are per-CPU; the agent sums them. Only context fields,
 * tracepoint args and bpf_skb_load_bytes are read: the kernel headers here
 * do not match the running kernel's struct layouts.
 */
#include <uapi/linux/bpf.h>
#include "lib/maps.h"

#define EQ_TCP_SYN_SENT 2
#define EQ_TCP_CLOSE 7

static __always_inline __u32 eq_bucket(__u64 ns)
{
    __u32 b = bpf_log2l(ns / 1000) - 1;   /* bpf_log2l(v) = floor(log2 v) + 1, and 1 for v = 0 */
    return b >= EQ_HIST_BUCKETS ? EQ_HIST_BUCKETS - 1 : b;
}

static __always_inline void eq_caller_add(struct eq_sock *s, __u64 conns, __u64 reqs, __u64 errs)
{
    struct eq_caller_key k = {};
    k.cgroup = s->caller;
    k.svc = s->svc;
    struct eq_caller_val *v = eq_tel_caller.lookup(&k);
    if (v) {
        v->connections += conns;
        v->requests += reqs;
        v->errors += errs;
        return;
    }
    struct eq_caller_val init = {};
    init.connections = conns;
    init.requests = reqs;
    init.errors = errs;
    eq_tel_caller.update(&k, &init);
}

/* Apply the halvings due since the slot's reference time (k half-lives). The
 * shifts are not atomic with other CPUs' adds: an add racing a halving can be
 * lost, which evidence (a running window, not an account) tolerates. */
static __always_inline void eq_cb_decay(struct eq_cb_slot *sl, __u64 now)
{
    __u64 k = (now - sl->last_ns) >> EQ_CB_HALF_SHIFT;
    if (!k)
        return;
    if (k > 63)
        k = 63;
    sl->attempts >>= k; sl->established >>= k; sl->refused >>= k; sl->reset >>= k;
    sl->timed_out >>= k; sl->requests >>= k; sl->responses >>= k; sl->resp_5xx >>= k;
    sl->req_errors >>= k; sl->conn_ns_sum >>= k; sl->req_ns_sum >>= k;
    sl->last_ns += k << EQ_CB_HALF_SHIFT;
}

/* This socket's caller's slot in its backend's evidence (eq_tel_cb): its own, else
 * a free one or one idle for EQ_CB_STALE_NS (taken over, counts zeroed); none
 * when every slot belongs to an active caller (then only eq_tel_be counts it).
 * Two CPUs taking the same free slot at once: the last write names the owner. */
static __always_inline struct eq_cb_slot *eq_cb(struct eq_sock *s)
{
    __u32 bid = s->backend;
    struct eq_cb *v = eq_tel_cb.lookup(&bid);
    if (!v)
        return 0;
    __u64 cg = s->caller, now = bpf_ktime_get_ns();
    int pick = -1;
#pragma unroll
    for (int i = 0; i < EQ_CB_SLOTS; i++) {
        struct eq_cb_slot *sl = &v->slot[i];
        if (sl->cgroup == cg) {
            eq_cb_decay(sl, now);
            return sl;
        }
        if (pick < 0 && (sl->cgroup == 0 || now - sl->last_ns > EQ_CB_STALE_NS))
            pick = i;
    }
    if (pick < 0)
        return 0;
    struct eq_cb_slot *sl = &v->slot[pick & (EQ_CB_SLOTS - 1)];
    sl->attempts = 0; sl->established = 0; sl->refused = 0; sl->reset = 0; sl->timed_out = 0;
    sl->requests = 0; sl->responses = 0; sl->resp_5xx = 0; sl->req_errors = 0;
    sl->conn_ns_sum = 0; sl->req_ns_sum = 0;
    sl->last_ns = now;
    sl->cgroup = cg;
    return sl;
}

/* `cb` must be a variable: the macro reads it twice */
#define EQ_CB_ADD(cb, field, n) do { if (cb) __sync_fetch_and_add(&(cb)->field, (n)); } while (0)

/* Whether the socket's backend id still names the backend it connected to:
 * an id handed to a new backend (eq_backend.gen bumped, its counters zeroed)
 * must not inherit the old connections' resets, 5xx or open count. */
static __always_inline int eq_current(struct eq_sock *s)
{
    __u32 id = s->backend;
    struct eq_backend *be = eq_lb_be.lookup(&id);
    return be && be->gen == s->be_gen;
}

/* Take a closed socket out of eq_lb_active unless sock_release already did
 * (the twin of lb.bpf.c's: bcc rewrites map access only in the main file). */
static __always_inline void eq_uncount(struct eq_sock *s)
{
    if (!(__sync_fetch_and_and(&s->flags, ~EQ_SK_COUNTED) & EQ_SK_COUNTED))
        return;
    if (!eq_current(s))
        return;
    __u32 id = s->backend;
    __s64 *n = eq_lb_active.lookup(&id);
    if (n)
        __sync_fetch_and_add(n, -1);
}

/* The counters of backend `bid`: its slot in the group value of eq_tel_be (bcc
 * rewrites map access only in this file, so the helper lives here). */
static __always_inline struct eq_be_tel *eq_tel(__u32 bid)
{
    __u32 group = bid / EQ_TEL_GROUP;
    struct eq_tel_group *g = eq_tel_be.lookup(&group);
    if (!g)
        return 0;
    return &g->be[bid & (EQ_TEL_GROUP - 1)];
}

int eq_sockops(struct bpf_sock_ops *skops)
{
    /* Decide on the operation first: most callbacks are of no interest, and
     * the cookie lookup is the expensive part. */
    __u32 op = skops->op;
    if (op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
        op != BPF_SOCK_OPS_STATE_CB)
        return 1;
    if (op == BPF_SOCK_OPS_STATE_CB && skops->args[1] != EQ_TCP_CLOSE)
        return 1;
    __u64 cookie = bpf_get_socket_cookie(skops);
    struct eq_sock *s = eq_tel_sock.lookup(&cookie);
    if (!s)
        return 1;               /* not a socket we translated */
    __u32 bid = s->backend;
    struct eq_be_tel *t = eq_current(s) ? eq_tel(bid) : 0;
    if (!t) {                   /* its id names another backend now: nothing to attribute */
        if (op == BPF_SOCK_OPS_STATE_CB) {
            eq_uncount(s);
            eq_tel_sock.delete(&cookie);
        }
        return 1;
    }

    struct eq_cb_slot *cb = eq_cb(s);
    if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
        s->start_ns = bpf_ktime_get_ns();
        t->attempts++;
        EQ_CB_ADD(cb, attempts, 1);
        __sync_fetch_and_or(&s->flags, EQ_SK_TRACKED); /* from now on sockops deletes the entry at TCP_CLOSE */
        eq_caller_add(s, 1, 0, 0);
        /* added to, not replacing, what other sockops programs on the path asked for */
        bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
    } else if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
        __u64 lat = bpf_ktime_get_ns() - s->start_ns;
        t->established++;
        t->conn_ns_sum += lat;
        EQ_CB_ADD(cb, established, 1);
        EQ_CB_ADD(cb, conn_ns_sum, lat);
        struct eq_be_hist *h = eq_tel_hist.lookup(&bid);
        if (h)
            __sync_fetch_and_add(&h->conn_hist[eq_bucket(lat) & (EQ_HIST_BUCKETS - 1)], 1);
        __sync_fetch_and_or(&s->flags, EQ_SK_ESTABLISHED);
    } else {                            /* STATE_CB -> TCP_CLOSE */
        if (skops->args[0] == EQ_TCP_SYN_SENT) {
            if (s->flags & EQ_SK_RST) {
                t->refused++;
                EQ_CB_ADD(cb, refused, 1);
            } else {
                t->timed_out++;
                EQ_CB_ADD(cb, timed_out, 1);
            }
            eq_caller_add(s, 0, 0, 1);
        } else {
            if (s->flags & EQ_SK_ESTABLISHED) {
                t->closed++;
                /* one smoothed-RTT sample per connection, at its end: cheaper
                 * than an RTT callback on every ACK */
                t->rtt_sum_us += skops->srtt_us >> 3;   /* srtt_us holds srtt << 3 */
                t->rtt_samples++;
            }
            if (s->flags & EQ_SK_RST) {
                t->reset++;
                EQ_CB_ADD(cb, reset, 1);
            }
            t->retrans += skops->total_retrans;
            t->bytes_sent += skops->bytes_acked;
            t->bytes_recv += skops->bytes_received;
            if (s->req_ns)
                t->req_done++;          /* no longer in flight */
            if (s->req_ns && !(s->flags & EQ_SK_ABORTED)) {   /* closed with a request unanswered */
                t->req_errors++;        /* (one the rebalancer cut off is not the backend's) */
                EQ_CB_ADD(cb, req_errors, 1);
                eq_caller_add(s, 0, 0, 1);
            } else if (s->flags & EQ_SK_RST) {
                eq_caller_add(s, 0, 0, 1);
            }
        }
        eq_uncount(s);
        eq_tel_sock.delete(&cookie);
    }
    return 1;
}

/* Payload bytes of a TCP segment; skb->data is at the network header in
 * cgroup_skb programs. Returns 0 when `len` bytes were copied. */
static __always_inline int eq_payload(struct __sk_buff *skb, void *buf, __u32 len)
{
    __u8 vihl = 0, doff = 0;
    if (bpf_skb_load_bytes(skb, 0, &vihl, 1))
        return -1;
    __u32 l3;
    if ((vihl >> 4) == 4)
        l3 = (vihl & 0xf) * 4;
    else if ((vihl >> 4) == 6)
        l3 = 40;                        /* extension headers are not followed */
    else
        return -1;
    if (bpf_skb_load_bytes(skb, l3 + 12, &doff, 1))
        return -1;
    __u32 off = l3 + (doff >> 4) * 4;
    if (skb->len < off + len)
        return -1;
    return bpf_skb_load_bytes(skb, off, buf, len);
}

static __always_inline int eq_is_method(__u32 w)
{
    /* first four bytes of the request line, little-endian */
    return w == 0x20544547 /* "GET " */ || w == 0x54534f50 /* "POST" */ ||
           w == 0x20545550 /* "PUT " */ || w == 0x44414548 /* "HEAD" */ ||
           w == 0x454c4544 /* "DELE" */ || w == 0x43544150 /* "PATC" */ ||
           w == 0x4954504f /* "OPTI" */;
}

/* Both skb programs look at the payload before the socket: most segments
 * (ACKs, continuations) are dismissed by two byte loads, not a map lookup. */
int eq_skb_egress(struct __sk_buff *skb)
{
    __u32 w = 0;
    if (eq_payload(skb, &w, 4) || !eq_is_method(w))
        return 1;
    __u64 cookie = bpf_get_socket_cookie(skb);
    struct eq_sock *s = eq_tel_sock.lookup(&cookie);
    if (!s || !eq_current(s))
        return 1;
    __u32 bid = s->backend;
    struct eq_be_tel *t = eq_tel(bid);
    if (!t)
        return 1;
    t->requests++;
    struct eq_cb_slot *cb = eq_cb(s);
    EQ_CB_ADD(cb, requests, 1);
    eq_caller_add(s, 0, 1, 0);
    if (!s->req_ns) {                   /* pipelined requests are counted, not timed */
        s->req_ns = bpf_ktime_get_ns();
        t->req_open++;                  /* this socket now has a request in flight */
    }
    return 1;
}

int eq_skb_ingress(struct __sk_buff *skb)
{
    char line[12] = {};
    if (eq_payload(skb, line, 12))
        return 1;
    /* "HTTP/1.x NNN" */
    if (line[0] != 'H' || line[1] != 'T' || line[2] != 'T' || line[3] != 'P' || line[4] != '/' ||
        line[5] != '1' || line[6] != '.' || line[8] != ' ')
        return 1;
    __u64 cookie = bpf_get_socket_cookie(skb);
    struct eq_sock *s = eq_tel_sock.lookup(&cookie);
    if (!s || !s->req_ns || !eq_current(s))
        return 1;
    __u32 bid = s->backend;
    struct eq_be_tel *t = eq_tel(bid);
    if (!t)
        return 1;
    char cls = line[9];
    if (cls < '1' || cls > '5')
        return 1;               /* not a status class: no response counted, none timed */
    __u64 ttfb = bpf_ktime_get_ns() - s->req_ns;
    s->req_ns = 0;
    t->req_done++;
    struct eq_cb_slot *cb = eq_cb(s);
    EQ_CB_ADD(cb, responses, 1);
    EQ_CB_ADD(cb, req_ns_sum, ttfb);
    t->req_ns_sum += ttfb;      /* every response counted below is timed: mean = sum / responses */
    struct eq_be_hist *h = eq_tel_hist.lookup(&bid);
    if (h)
        __sync_fetch_and_add(&h->req_hist[eq_bucket(ttfb) & (EQ_HIST_BUCKETS - 1)], 1);
    switch (cls) {
    case '1': t->resp_1xx++; break;
    case '2': t->resp_2xx++; break;
    case '3': t->resp_3xx++; break;
    case '4': t->resp_4xx++; break;
    case '5': t->resp_5xx++; EQ_CB_ADD(cb, resp_5xx, 1); eq_caller_add(s, 0, 0, 1); break;
    }
    return 1;
}

TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
    __u64 cookie = args->sock_cookie;
    struct eq_sock *s = eq_tel_sock.lookup(&cookie);
    if (s)
        __sync_fetch_and_or(&s->flags, EQ_SK_RST);  /* atomic: release may clear COUNTED meanwhile */
    return 0;
}
