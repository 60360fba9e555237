/* Service translation: cgroup sock_addr programs.
 *
 * connect4/6 and sendmsg4/6 steer a frontend (virtual IP and port) to a
 * backend chosen from the service's slot table; getpeername4/6 and
 * recvmsg4/6 show the frontend back to the application.
 *
 * Selection is O(1): each service owns two slot tables of EQ_SLOTS entries
 * (double-buffered; eq_svc.gen says which is live). The agent fills the idle
 * copy from the weights by largest-remainder apportionment, then flips gen,
 * so a reader never sees half an update. The kernel picks one slot (random,
 * or the next of a per-CPU sweep: EQ_SVC_SWEEP), or that and a random one
 * and the less loaded of them (EQ_SVC_P2C, see eq_pick_once).
 *
 * Each program is written once for both families: eq_translate and
 * eq_reverse take a constant `v6`, and the address helpers of lib/addr.h
 * move addresses between the context and the four-word shape every map
 * stores, so inlining leaves each entry point only its own family's code.
 *
 * Helpers that touch a map live in this file, not in headers under bpf/lib:
 * bcc rewrites map accesses (`map.lookup()`) only in the main source file.
 * Pure helpers are in lib/addr.h and lib/pick.h; shared structs in lib/types.h.
 */
#include <uapi/linux/bpf.h>
#include "lib/maps.h"
#include "lib/addr.h"
#include "lib/pick.h"

#ifndef EHOSTUNREACH
#define EHOSTUNREACH 113
#endif
#ifndef ECONNREFUSED
#define ECONNREFUSED 111
#endif

enum eq_result { EQ_PICKED = 0, EQ_NONE = 1, EQ_STALE = 2, EQ_REV_FAIL = 3 };

static __always_inline void eq_count_err(__u32 svc_id, int what)
{
    struct eq_svc_errs *e = eq_lb_svc_err.lookup(&svc_id);
    if (!e)
        return;
    if (what == EQ_NONE)
        e->no_backend++;          /* per-CPU: no atomics needed */
    else if (what == EQ_STALE)
        e->stale_slot++;
    else
        e->rev_update++;
}

/* Open connections this node holds to a backend id (never below 0). */
static __always_inline __s64 eq_load(__u32 id)
{
    __s64 *n = eq_lb_active.lookup(&id);
    return (n && *n > 0) ? *n : 0;
}

/* One draw from the live slot table of svc_id.
 *
 * The first slot is random, or with EQ_SVC_SWEEP the next point of this CPU's
 * sweep of the table (eq_sweep_slot: round robin by weight).
 * With EQ_SVC_P2C (weighted power of two choices) two slots are drawn and the
 * backend with fewer open connections per slot wins, the first unless the
 * second is clearly (1/16) less loaded.
 * With nothing in flight that is exactly the weighted draw; under load it
 * evens out the queues that build up between two agent ticks, with what this
 * node knows now: the weights say where traffic should go, the counts where it
 * has gone. */
static __always_inline int eq_pick_once(__u32 svc_id, struct eq_backend **out, __u32 *out_id)
{
    struct eq_svc *svc = eq_lb_svc.lookup(&svc_id);
    if (!svc || svc->n_avail == 0)
        return EQ_NONE;
    __u32 gen = svc->gen & 1;
    __u32 half = svc_id * 2 + gen;
    struct eq_table *t = eq_lb_slots.lookup(&half);   /* one lookup: the whole table half */
    if (!t)
        return EQ_NONE;
    __u32 r = bpf_get_prandom_u32();
    __u32 s1 = eq_slot1(r);
    if (svc->flags & EQ_SVC_SWEEP) {
        __u32 *c = eq_lb_cursor.lookup(&svc_id);
        if (c) {
            __u32 k = *c ? *c : r;   /* a CPU's first connect starts at a random point */
            *c = k + 1;
            s1 = eq_sweep_slot(k, svc->n_avail) & (EQ_SLOTS - 1);
        }
    }
    __u32 v1 = t->be[s1];
    if (v1 == EQ_NO_BACKEND)
        return EQ_NONE;
    __u32 id = v1 & EQ_ID_MASK;
    __s64 l1 = (svc->flags & EQ_SVC_P2C) ? eq_load(id) : 0;
    if (l1 > 0) {   /* an idle first choice cannot be beaten: no second draw (the common case at low load) */
        __u32 v2 = t->be[eq_slot2(r)];
        __u32 id2 = v2 & EQ_ID_MASK;
        if (v2 != EQ_NO_BACKEND && id2 != id) {
            if (eq_second_wins(l1, v1 >> EQ_ID_BITS, eq_load(id2), v2 >> EQ_ID_BITS))
                id = id2;
        }
    }
    struct eq_backend *be = eq_lb_be.lookup(&id);
    if (!be || be->svc != svc_id || be->state != EQ_BE_ACTIVE)
        return EQ_STALE;
    *out = be;
    *out_id = id;
    return EQ_PICKED;
}

/* Pick a backend; a stale slot (backend drained after its table was read)
 * gets two more draws rather than a failed connect. No loop: unrolled by hand. */
static __always_inline int eq_pick(__u32 svc_id, struct eq_backend **out, __u32 *out_id)
{
    int r = eq_pick_once(svc_id, out, out_id);
    if (r == EQ_STALE)
        r = eq_pick_once(svc_id, out, out_id);
    if (r == EQ_STALE)
        r = eq_pick_once(svc_id, out, out_id);
    if (r == EQ_PICKED) {
        struct eq_be_stats *st = eq_lb_be_stat.lookup(out_id);
        if (st)
            st->selections++;
    } else {
        eq_count_err(svc_id, r);
    }
    return r;
}

/* Fail the syscall with EHOSTUNREACH: a service with nothing available
 * answers at once instead of letting the client hang on the frontend. */
static __always_inline int eq_reject(void)
{
    bpf_set_retval(-EHOSTUNREACH);
    return 0;
}

/* Folk-theorem enforcement: a caller the agent punishes for flooding a service
 * has a budget (eq_lb_budget); a connect within it, or from a caller without one,
 * goes on. Over it: counted, and refused with ECONNREFUSED in throttle mode (at
 * once, like a port with no listener: never a hang), let through in observe mode.
 * Returns 0 to refuse. */
static __always_inline int eq_admit(__u32 sid)
{
    __u32 *any = eq_lb_budgeted.lookup(&sid);   /* the common case: nobody punished, one array read */
    if (!any || !*any)
        return 1;
    struct eq_caller_key k = {};
    k.cgroup = bpf_get_current_cgroup_id();
    k.svc = sid;
    struct eq_budget *b = eq_lb_budget.lookup(&k);
    if (!b)
        return 1;
    __u64 now = bpf_ktime_get_ns();
    __u64 tat = b->tat > now ? b->tat : now;
    if (tat - now > b->burst_ns) {
        if (b->mode == EQ_ENFORCE_THROTTLE) {
            __sync_fetch_and_add(&b->throttled, 1);
            return 0;
        }
        __sync_fetch_and_add(&b->observed, 1);
        return 1;
    }
    b->tat = tat + b->interval_ns;
    __sync_fetch_and_add(&b->admitted, 1);
    return 1;
}

static __always_inline int eq_refuse(void)
{
    bpf_set_retval(-ECONNREFUSED);
    return 0;
}

/* Remember a translated socket: reverse translation and telemetry read it,
 * and count it as open to its backend. One map insert per connect: the only
 * per-connect write besides counters. */
static __always_inline void eq_uncount(struct eq_sock *s);

static __always_inline void eq_track(struct bpf_sock_addr *ctx, __u32 sid, __u32 bid, struct eq_backend *be,
                                     struct eq_sock *s)
{
    __u64 cookie = bpf_get_socket_cookie(ctx);
    /* A re-connect (UDP connects as often as it likes; TCP after a failed connect):
     * the count the socket holds goes before the entry is replaced. */
    struct eq_sock *prev = eq_tel_sock.lookup(&cookie);
    if (prev)
        eq_uncount(prev);
    eq_addr_copy(s->be_addr, be->addr);
    s->be_port = be->port;
    s->backend = bid;
    s->svc = sid;
    s->be_gen = be->gen;
#if EQ_TELEMETRY
    /* only here is the caller's context at hand; the clock is read in sockops */
    s->caller = bpf_get_current_cgroup_id();
#endif
    s->flags = EQ_SK_COUNTED;
    if (eq_tel_sock.update(&cookie, s) != 0) {
        eq_count_err(sid, EQ_REV_FAIL);
        return;
    }
    __s64 *n = eq_lb_active.lookup(&bid);
    if (n)
        __sync_fetch_and_add(n, 1);
}

/* Take a socket out of eq_lb_active, once: the first of sock_release and
 * sockops' TCP_CLOSE does it (the flag is cleared atomically, so the two
 * cannot both count it down). Not if its backend id was handed to another
 * backend since (generation changed): the agent zeroed that count. */
static __always_inline void eq_uncount(struct eq_sock *s)
{
    if (!(__sync_fetch_and_and(&s->flags, ~EQ_SK_COUNTED) & EQ_SK_COUNTED))
        return;
    __u32 id = s->backend;
    struct eq_backend *be = eq_lb_be.lookup(&id);
    if (!be || be->gen != s->be_gen)
        return;
    __s64 *n = eq_lb_active.lookup(&id);
    if (n)
        __sync_fetch_and_add(n, -1);
}

/* The service id of a frontend, or NULL. `fe` is the IPv6 key, which holds
 * either family's address (IPv4 in word 0); IPv4 frontends have their own map. */
static __always_inline __u32 *eq_frontend(int v6, struct eq_fe6_key *fe)
{
    if (v6)
        return eq_lb6_fe.lookup(fe);
    struct eq_fe4_key k4 = {};
    k4.addr = fe->addr[0];
    k4.port = fe->port;
    k4.proto = fe->proto;
    return eq_lb4_fe.lookup(&k4);
}

/* ---- unconnected UDP: reverse entries, owned by their socket ---- */

enum eq_rev_what { EQ_REV_INSERTED = 0, EQ_REV_RELEASED = 1, EQ_REV_EVICTED = 2, EQ_REV_UNTRACKED = 3 };

static __always_inline void eq_rev_count(int what)
{
    __u32 zero = 0;
    struct eq_rev_stat *st = eq_lb_rev_stat.lookup(&zero);
    if (!st)
        return;                   /* per-CPU: no atomics needed */
    if (what == EQ_REV_INSERTED)
        st->inserted++;
    else if (what == EQ_REV_RELEASED)
        st->released++;
    else if (what == EQ_REV_EVICTED)
        st->evicted++;
    else
        st->untracked++;
}

static __always_inline int eq_revsk_same(const struct eq_revsk_ent *e, int v6, const __u32 addr[4], __u16 port)
{
    return e->v6 == v6 && e->port == port && e->addr[0] == addr[0] && e->addr[1] == addr[1] &&
           e->addr[2] == addr[2] && e->addr[3] == addr[3];
}

/* Note in the socket's eq_lb_revsk record that it has a reverse entry for
 * (backend addr, port) in the v4 or v6 map, so that sock_release deletes it.
 * A pair already noted costs one lookup and a few compares. */
static __always_inline void eq_revsk_note(__u64 cookie, int v6, const __u32 addr[4], __u16 port)
{
    struct eq_revsk *r = eq_lb_revsk.lookup(&cookie);
    if (!r) {
        struct eq_revsk init = {};
        eq_lb_revsk.update(&cookie, &init);
        r = eq_lb_revsk.lookup(&cookie);
        if (!r) {                 /* eq_lb_revsk full: this entry is the LRU's */
            eq_rev_count(EQ_REV_UNTRACKED);
            return;
        }
    }
    int free = -1;
#pragma unroll
    for (int i = 0; i < EQ_REVSK_N; i++) {
        if (r->e[i].used) {
            if (eq_revsk_same(&r->e[i], v6, addr, port))
                return;
        } else if (free < 0) {
            free = i;
        }
    }
    if (free < 0) {
        eq_rev_count(EQ_REV_UNTRACKED);
        return;
    }
    struct eq_revsk_ent *e = &r->e[free & (EQ_REVSK_N - 1)];
    eq_addr_copy(e->addr, addr);
    e->port = port;
    e->v6 = v6;
    e->used = 1;
    eq_rev_count(EQ_REV_INSERTED);
}

/* sock_release: the socket's reverse entries go with it. */
static __always_inline void eq_rev_forget(__u64 cookie)
{
    struct eq_revsk *r = eq_lb_revsk.lookup(&cookie);
    if (!r)
        return;
#pragma unroll
    for (int i = 0; i < EQ_REVSK_N; i++) {
        struct eq_revsk_ent *e = &r->e[i];
        if (!e->used)
            continue;
        int err;
        if (e->v6) {
            struct eq_rev6_key k6 = {};
            k6.cookie = cookie;
            eq_addr_copy(k6.addr, e->addr);
            k6.port = e->port;
            err = eq_lb6_rev.delete(&k6);
        } else {
            struct eq_rev4_key k4 = {};
            k4.cookie = cookie;
            k4.addr = e->addr[0];
            k4.port = e->port;
            err = eq_lb4_rev.delete(&k4);
        }
        eq_rev_count(EQ_REV_RELEASED);
        if (err)
            eq_rev_count(EQ_REV_EVICTED);
    }
    eq_lb_revsk.delete(&cookie);
}

/* Unconnected UDP: a socket may talk to several backends, so the frontend it
 * sent to is remembered by (socket, backend). `v6` names the map: an IPv4-mapped
 * destination of an IPv6 socket is kept in the IPv4 one. */
static __always_inline void eq_rev_remember(struct bpf_sock_addr *ctx, int v6, __u32 sid, struct eq_backend *be,
                                            const __u32 fe[4], __u16 fe_port)
{
    __u64 cookie = bpf_get_socket_cookie(ctx);
    int err;
    if (v6) {
        struct eq_rev6_key rk6 = {};
        rk6.cookie = cookie;
        eq_addr_copy(rk6.addr, be->addr);
        rk6.port = be->port;
        struct eq_rev6_val rv6 = {};
        eq_addr_copy(rv6.addr, fe);
        rv6.port = fe_port;
        err = eq_lb6_rev.update(&rk6, &rv6);
    } else {
        struct eq_rev4_key rk4 = {};
        rk4.cookie = cookie;
        rk4.addr = be->addr[0];
        rk4.port = be->port;
        struct eq_rev4_val rv4 = {};
        rv4.addr = fe[0];
        rv4.port = fe_port;
        err = eq_lb4_rev.update(&rk4, &rv4);
    }
    if (err != 0)
        eq_count_err(sid, EQ_REV_FAIL);
    else
        eq_revsk_note(cookie, v6, be->addr, be->port);
}

/* ... and shown back to it on recvmsg, if this (socket, backend) sent to one.
 * `peer` is the datagram's source in the stored shape (IPv4 in word 0). */
static __always_inline void eq_rev_restore(struct bpf_sock_addr *ctx, int v6, int mapped, __u64 cookie,
                                           const __u32 peer[4])
{
    if (v6 && !mapped) {
        struct eq_rev6_key rk6 = {};
        rk6.cookie = cookie;
        eq_addr_copy(rk6.addr, peer);
        rk6.port = (__u16)ctx->user_port;
        struct eq_rev6_val *rv6 = eq_lb6_rev.lookup(&rk6);
        if (rv6)
            eq_ctx_set_addr(ctx, 1, rv6->addr, rv6->port);
        return;
    }
    struct eq_rev4_key rk4 = {};
    rk4.cookie = cookie;
    rk4.addr = peer[0];
    rk4.port = (__u16)ctx->user_port;
    struct eq_rev4_val *rv4 = eq_lb4_rev.lookup(&rk4);
    if (rv4) {
        __u32 a[4] = {rv4->addr, 0, 0, 0};
        eq_ctx_set_shown(ctx, v6, mapped, a, rv4->port);
    }
}

/* connect / sendmsg: steer a frontend to a backend of its service. An IPv6
 * socket's IPv4-mapped address (::ffff:a.b.c.d, dual-stack clients) is looked
 * up as the IPv4 frontend and rewritten to the mapped backend address. */
static __always_inline int eq_translate(struct bpf_sock_addr *ctx, int v6, int is_sendmsg)
{
    struct eq_fe6_key fe = {};
    eq_ctx_get_addr(ctx, v6, fe.addr);
    int mapped = v6 && eq_unmap(fe.addr);
    fe.port = (__u16)ctx->user_port;
    fe.proto = (__u8)ctx->protocol;
    __u32 *svc_id = eq_frontend(v6 && !mapped, &fe);
    if (!svc_id)
        return 1;                 /* not a frontend: leave untouched */
    __u32 sid = *svc_id;
    if (!eq_admit(sid))
        return eq_refuse();
    struct eq_backend *be = 0;
    __u32 bid = 0;
    if (eq_pick(sid, &be, &bid) != EQ_PICKED || !be)
        return eq_reject();
    if (mapped && be->family != 4)
        mapped = 0;               /* an IPv6 backend of an IPv4 frontend: a dual-stack socket reaches it as is */

    if (is_sendmsg) {
        eq_rev_remember(ctx, v6 && !mapped, sid, be, fe.addr, fe.port);
    } else {
        struct eq_sock s = {};
        eq_addr_copy(s.fe_addr, fe.addr);
        s.fe_port = fe.port;
        if (fe.proto == 17)   /* connected UDP: its age for the rebalancer (sockops times TCP only) */
            s.start_ns = bpf_ktime_get_ns();
        eq_track(ctx, sid, bid, be, &s);
    }
    eq_ctx_set_shown(ctx, v6, mapped, be->addr, be->port);
    return 1;
}

/* getpeername / recvmsg: show the frontend instead of the backend.
 * Connected sockets (TCP, connected UDP) are found by cookie in eq_tel_sock;
 * unconnected UDP by (cookie, backend) in eq_lb4_rev / eq_lb6_rev. */
static __always_inline int eq_reverse(struct bpf_sock_addr *ctx, int v6, int is_recvmsg)
{
    __u64 cookie = bpf_get_socket_cookie(ctx);
    __u32 peer[4];
    eq_ctx_get_addr(ctx, v6, peer);
    int mapped = v6 && eq_unmap(peer);
    struct eq_sock *s = eq_tel_sock.lookup(&cookie);
    if (s && s->be_port == (__u16)ctx->user_port && s->be_addr[0] == peer[0] && s->be_addr[1] == peer[1] &&
        s->be_addr[2] == peer[2] && s->be_addr[3] == peer[3]) {
        eq_ctx_set_shown(ctx, v6, mapped, s->fe_addr, s->fe_port);
        return 1;
    }
    if (is_recvmsg)
        eq_rev_restore(ctx, v6, mapped, cookie, peer);
    return 1;
}

/* A closing socket's entry goes with it (and its count with the first of
 * release and TCP_CLOSE), so the map holds live sockets only
 * and inserts never pay for LRU eviction. TCP sockets that sockops tracks
 * keep theirs until TCP_CLOSE: telemetry still needs them after close().
 * An unconnected UDP socket's reverse entries go too. */
static __always_inline void eq_release(struct bpf_sock *sk)
{
    __u64 cookie = bpf_get_socket_cookie(sk);
    if (sk->protocol == 17)
        eq_rev_forget(cookie);
    struct eq_sock *s = eq_tel_sock.lookup(&cookie);
    if (!s)
        return;
    eq_uncount(s);
    if (!(s->flags & EQ_SK_TRACKED))
        eq_tel_sock.delete(&cookie);
}

/* ---- entry points ---- */
int eq_connect4(struct bpf_sock_addr *ctx) { return eq_translate(ctx, 0, 0); }
int eq_connect6(struct bpf_sock_addr *ctx) { return eq_translate(ctx, 1, 0); }
/* Unconnected UDP: each datagram to a frontend is steered on its own. */
int eq_sendmsg4(struct bpf_sock_addr *ctx) { return eq_translate(ctx, 0, 1); }
int eq_sendmsg6(struct bpf_sock_addr *ctx) { return eq_translate(ctx, 1, 1); }
int eq_getpeername4(struct bpf_sock_addr *ctx) { return eq_reverse(ctx, 0, 0); }
int eq_getpeername6(struct bpf_sock_addr *ctx) { return eq_reverse(ctx, 1, 0); }
int eq_recvmsg4(struct bpf_sock_addr *ctx) { return eq_reverse(ctx, 0, 1); }
int eq_recvmsg6(struct bpf_sock_addr *ctx) { return eq_reverse(ctx, 1, 1); }
int eq_sock_release(struct bpf_sock *sk) { eq_release(sk); return 1; }
