/* Service translation: cgroup sock_addr programs.
 *
 * connect4/6 and sendmsg4/6 steer a frontend (virtual IP and port) to a
 * backend chosen from the service's slot table; getpeername4/6 and
 * recvmsg4/6 show the frontend back to the application.
 *
 * Selection is O(1): each service owns two slot tables of EQ_SLOTS entries
 * (double-buffered; eq_svc.gen says which is live). The agent fills the idle
 * copy from the weights by largest-remainder apportionment, then flips gen,
 * so a reader never sees half an update. The kernel picks one random slot.
 *
 * Why the helpers are in this file and not in headers under bpf/lib: bcc rewrites map
 * accesses (`map.lookup()`) only in the main source file, so any function
 * that touches a map must live here. Shared structs stay in lib/types.h.
 */
#include <uapi/linux/bpf.h>
#include "lib/types.h"

#ifndef EHOSTUNREACH
#define EHOSTUNREACH 113
#endif

#define EQ_PIN(name) EQ_PIN_DIR "/" #name

BPF_TABLE_PINNED("hash", struct eq_fe4_key, __u32, eq_lb4_fe, EQ_MAX_SERVICES, EQ_PIN(eq_lb4_fe));
BPF_TABLE_PINNED("hash", struct eq_fe6_key, __u32, eq_lb6_fe, EQ_MAX_SERVICES, EQ_PIN(eq_lb6_fe));
BPF_TABLE_PINNED("array", __u32, struct eq_svc, eq_lb_svc, EQ_MAX_SERVICES, EQ_PIN(eq_lb_svc));
BPF_TABLE_PINNED("array", __u32, __u32, eq_lb_slots, EQ_MAX_SERVICES * 2 * EQ_SLOTS, EQ_PIN(eq_lb_slots));
BPF_TABLE_PINNED("array", __u32, struct eq_backend, eq_lb_be, EQ_MAX_BACKENDS, EQ_PIN(eq_lb_be));
BPF_TABLE_PINNED("lru_hash", struct eq_rev4_key, struct eq_rev4_val, eq_lb4_rev, EQ_MAX_REVNAT, EQ_PIN(eq_lb4_rev));
BPF_TABLE_PINNED("lru_hash", struct eq_rev6_key, struct eq_rev6_val, eq_lb6_rev, EQ_MAX_REVNAT, EQ_PIN(eq_lb6_rev));
BPF_TABLE_PINNED("percpu_array", __u32, struct eq_be_stats, eq_lb_be_stat, EQ_MAX_BACKENDS, EQ_PIN(eq_lb_be_stat));
BPF_TABLE_PINNED("percpu_array", __u32, struct eq_svc_errs, eq_lb_svc_err, EQ_MAX_SERVICES, EQ_PIN(eq_lb_svc_err));
BPF_TABLE_PINNED("array", __u32, struct eq_svc_name, eq_svc_name, EQ_MAX_SERVICES, EQ_PIN(eq_svc_name));
BPF_TABLE_PINNED("array", __u32, struct eq_meta, eq_meta, 1, EQ_PIN(eq_meta));

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

/* One draw from the live slot table of svc_id. */
static __always_inline int eq_pick_once(__u32 svc_id, struct eq_backend **out, __u32 *out_id)
{
    struct eq_svc *svc = eq_lb_svc.lookup(&svc_id);
    if (!svc || svc->n_avail == 0)
        return EQ_NONE;
    __u32 idx = ((svc_id * 2 + (svc->gen & 1)) * EQ_SLOTS) + (bpf_get_prandom_u32() & (EQ_SLOTS - 1));
    __u32 *bid = eq_lb_slots.lookup(&idx);
    if (!bid || *bid == EQ_NO_BACKEND)
        return EQ_NONE;
    __u32 id = *bid;
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

static __always_inline int eq_translate4(struct bpf_sock_addr *ctx)
{
    struct eq_fe4_key fk = {};
    fk.addr = ctx->user_ip4;
    fk.port = (__u16)ctx->user_port;
    fk.proto = (__u8)ctx->protocol;
    __u32 *svc_id = eq_lb4_fe.lookup(&fk);
    if (!svc_id)
        return 1;                 /* not a frontend: leave untouched */
    __u32 sid = *svc_id;
    struct eq_backend *be = 0;
    __u32 bid = 0;
    if (eq_pick(sid, &be, &bid) != EQ_PICKED || !be)
        return eq_reject();

    struct eq_rev4_key rk = {};
    rk.cookie = bpf_get_socket_cookie(ctx);
    rk.addr = be->addr[0];
    rk.port = be->port;
    struct eq_rev4_val rv = {};
    rv.addr = fk.addr;
    rv.port = fk.port;
    if (eq_lb4_rev.update(&rk, &rv) != 0)
        eq_count_err(sid, EQ_REV_FAIL);

    ctx->user_ip4 = be->addr[0];
    ctx->user_port = be->port;
    return 1;
}

static __always_inline int eq_translate6(struct bpf_sock_addr *ctx)
{
    struct eq_fe6_key fk = {};
    fk.addr[0] = ctx->user_ip6[0];
    fk.addr[1] = ctx->user_ip6[1];
    fk.addr[2] = ctx->user_ip6[2];
    fk.addr[3] = ctx->user_ip6[3];
    fk.port = (__u16)ctx->user_port;
    fk.proto = (__u8)ctx->protocol;
    __u32 *svc_id = eq_lb6_fe.lookup(&fk);
    if (!svc_id)
        return 1;
    __u32 sid = *svc_id;
    struct eq_backend *be = 0;
    __u32 bid = 0;
    if (eq_pick(sid, &be, &bid) != EQ_PICKED || !be)
        return eq_reject();

    struct eq_rev6_key rk = {};
    rk.cookie = bpf_get_socket_cookie(ctx);
    rk.addr[0] = be->addr[0];
    rk.addr[1] = be->addr[1];
    rk.addr[2] = be->addr[2];
    rk.addr[3] = be->addr[3];
    rk.port = be->port;
    struct eq_rev6_val rv = {};
    rv.addr[0] = fk.addr[0];
    rv.addr[1] = fk.addr[1];
    rv.addr[2] = fk.addr[2];
    rv.addr[3] = fk.addr[3];
    rv.port = fk.port;
    if (eq_lb6_rev.update(&rk, &rv) != 0)
        eq_count_err(sid, EQ_REV_FAIL);

    ctx->user_ip6[0] = be->addr[0];
    ctx->user_ip6[1] = be->addr[1];
    ctx->user_ip6[2] = be->addr[2];
    ctx->user_ip6[3] = be->addr[3];
    ctx->user_port = be->port;
    return 1;
}

/* getpeername / recvmsg: show the frontend instead of the backend. */
static __always_inline int eq_reverse4(struct bpf_sock_addr *ctx)
{
    struct eq_rev4_key rk = {};
    rk.cookie = bpf_get_socket_cookie(ctx);
    rk.addr = ctx->user_ip4;
    rk.port = (__u16)ctx->user_port;
    struct eq_rev4_val *rv = eq_lb4_rev.lookup(&rk);
    if (rv) {
        ctx->user_ip4 = rv->addr;
        ctx->user_port = rv->port;
    }
    return 1;
}

static __always_inline int eq_reverse6(struct bpf_sock_addr *ctx)
{
    struct eq_rev6_key rk = {};
    rk.cookie = bpf_get_socket_cookie(ctx);
    rk.addr[0] = ctx->user_ip6[0];
    rk.addr[1] = ctx->user_ip6[1];
    rk.addr[2] = ctx->user_ip6[2];
    rk.addr[3] = ctx->user_ip6[3];
    rk.port = (__u16)ctx->user_port;
    struct eq_rev6_val *rv = eq_lb6_rev.lookup(&rk);
    if (rv) {
        ctx->user_ip6[0] = rv->addr[0];
        ctx->user_ip6[1] = rv->addr[1];
        ctx->user_ip6[2] = rv->addr[2];
        ctx->user_ip6[3] = rv->addr[3];
        ctx->user_port = rv->port;
    }
    return 1;
}

/* ---- entry points ---- */

int eq_connect4(struct bpf_sock_addr *ctx) { return eq_translate4(ctx); }
int eq_connect6(struct bpf_sock_addr *ctx) { return eq_translate6(ctx); }
/* Unconnected UDP: each datagram to a frontend is steered on its own. */
int eq_sendmsg4(struct bpf_sock_addr *ctx) { return eq_translate4(ctx); }
int eq_sendmsg6(struct bpf_sock_addr *ctx) { return eq_translate6(ctx); }
int eq_getpeername4(struct bpf_sock_addr *ctx) { return eq_reverse4(ctx); }
int eq_getpeername6(struct bpf_sock_addr *ctx) { return eq_reverse6(ctx); }
int eq_recvmsg4(struct bpf_sock_addr *ctx) { return eq_reverse4(ctx); }
int eq_recvmsg6(struct bpf_sock_addr *ctx) { return eq_reverse6(ctx); }
