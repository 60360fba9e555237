/* Connection rebalancing: a TCP socket iterator that closes connections the
 * agent wants moved, so that pools reconnect and connect() steers the new
 * connection by the current weights.
 *
 * The agent runs it once per tick when there is work (reading the pinned
 * iterator link runs it), in every network namespace whose clients it steers:
 * an iterator walks the sockets of the namespace it is read in. For each
 * established socket the telemetry tracks (eq_tel_sock) it decides:
 *   max age  older than the service's max_age_ns: closed, idle or not
 *   drain    its backend is draining, quarantined or gone: closed when idle
 *   excess   its backend holds more than its share: closed when idle, while
 *            the backend's quota (eq_rb_quota, written by the agent) lasts
 * "Idle": no HTTP request outstanding (telemetry), nothing unacknowledged
 * sent, nothing received the application has not read, no segment for
 * min_idle_ns, and the connection is at least min_age_ns old. Every close
 * also takes one from the service's budget for this tick (the agent may walk
 * several times a tick). Output: "<svc> <backend> <reason>" per close, "busy"
 * per connection wanted but not idle (the agent walks again sooner), "young"
 * per connection wanted but younger than min_age_ns (it asks again next tick).
 *
 * bpf_sock_destroy() aborts the socket: the peer gets a RST, a client polling
 * its pooled connection sees POLLERR|POLLHUP at once and replaces it; a write
 * fails with ECONNABORTED.
 *
 * Built with clang against the running kernel's BTF (vmlinux.h, CO-RE), not
 * bcc: it reads struct tcp_sock. Maps are shared with the bcc-built programs
 * through pins (LIBBPF_PIN_BY_NAME under the same pin directory); their
 * definitions must match lib/maps.h exactly or libbpf refuses to reuse the pin.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "lib/types.h"

char LICENSE[] SEC("license") = "GPL";

extern int bpf_sock_destroy(struct sock_common *sk) __ksym;

#define EQ_TCP_ESTABLISHED 1

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, EQ_MAX_SOCKS);
    __type(key, __u64);
    __type(value, struct eq_sock);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} eq_tel_sock SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, EQ_MAX_BACKENDS);
    __type(key, __u32);
    __type(value, struct eq_backend);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} eq_lb_be SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, EQ_MAX_SERVICES);
    __type(key, __u32);
    __type(value, struct eq_rb_svc);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} eq_rb_svc SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, EQ_MAX_BACKENDS);
    __type(key, __u32);
    __type(value, __s64);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} eq_rb_quota SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, EQ_MAX_BACKENDS);
    __type(key, __u32);
    __type(value, struct eq_rb_closed);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} eq_rb_closed SEC(".maps");

/* The socket's backend id no longer names the backend it is connected to
 * (removed, or the id reused), or that backend takes no new connections. */
static __always_inline int eq_gone(struct eq_backend *be, struct eq_sock *e)
{
    return be->svc != e->svc || be->state != EQ_BE_ACTIVE || be->port != e->be_port ||
           be->addr[0] != e->be_addr[0] || be->addr[1] != e->be_addr[1] ||
           be->addr[2] != e->be_addr[2] || be->addr[3] != e->be_addr[3];
}

/* Nothing in flight that a close would lose, and quiet for min_idle_ns. */
static __always_inline int eq_idle(struct sock_common *skc, struct eq_sock *e, __u64 now, __u64 min_idle_ns)
{
    if (e->req_ns)
        return 0;                       /* an HTTP request is waiting for its response */
    struct tcp_sock *tp = bpf_skc_to_tcp_sock(skc);
    if (!tp)
        return 0;
    if (tp->snd_una != tp->snd_nxt || tp->rcv_nxt != tp->copied_seq)
        return 0;                       /* bytes unacknowledged, or received and not read yet */
    /* tcp_mstamp: µs (CLOCK_MONOTONIC, as bpf_ktime_get_ns) of the last segment in or out */
    return now / 1000 >= tp->tcp_mstamp + min_idle_ns / 1000;
}

/* Connected UDP (iter/udp): the kernel sees no exchange in flight, so only what
 * the service asked for or what cannot be kept is closed: sockets older than
 * max_age_ns, and sockets whose backend was removed (its id no longer names it).
 * A draining backend's UDP sockets are left alone. The application's next call
 * on the socket fails with ECONNABORTED; it reconnects (and is steered anew). */
SEC("iter/udp")
int eq_rebalance_udp(struct bpf_iter__udp *ctx)
{
    struct udp_sock *udp = ctx->udp_sk;
    if (!udp)
        return 0;
    struct sock_common *skc = &udp->inet.sk.__sk_common;
    if (skc->skc_state != EQ_TCP_ESTABLISHED)   /* connected */
        return 0;
    __u64 cookie = bpf_get_socket_cookie(skc);
    struct eq_sock *e = bpf_map_lookup_elem(&eq_tel_sock, &cookie);
    if (!e)
        return 0;
    __u32 svc = e->svc, id = e->backend;
    struct eq_rb_svc *rs = bpf_map_lookup_elem(&eq_rb_svc, &svc);
    if (!rs || rs->budget <= 0)
        return 0;
    struct eq_rb_closed *closed = bpf_map_lookup_elem(&eq_rb_closed, &id);
    struct eq_backend *be = bpf_map_lookup_elem(&eq_lb_be, &id);
    if (!closed || !be)
        return 0;
    __u64 age = bpf_ktime_get_ns() - e->start_ns;
    __u32 reason;
    if (rs->max_age_ns && age >= rs->max_age_ns) {
        reason = EQ_RB_AGE;
    } else if ((rs->flags & EQ_RB_IDLE) && eq_gone(be, e) && be->state != EQ_BE_DRAINING) {
        if (age < rs->min_age_ns) {
            BPF_SEQ_PRINTF(ctx->meta->seq, "young\n");
            return 0;
        }
        reason = EQ_RB_DRAIN;
    } else {
        return 0;
    }
    if (__sync_fetch_and_add(&rs->budget, -1) <= 0)
        return 0;
    if (bpf_sock_destroy(skc))
        return 0;
    __sync_fetch_and_add(&closed->n[reason], 1);
    BPF_SEQ_PRINTF(ctx->meta->seq, "%u %u %u\n", svc, id, reason);
    return 0;
}

SEC("iter/tcp")
int eq_rebalance(struct bpf_iter__tcp *ctx)
{
    struct sock_common *skc = ctx->sk_common;
    if (!skc || skc->skc_state != EQ_TCP_ESTABLISHED)
        return 0;
    __u64 cookie = bpf_get_socket_cookie(skc);
    struct eq_sock *e = bpf_map_lookup_elem(&eq_tel_sock, &cookie);
    if (!e)
        return 0;                       /* not a connection we steered */
    __u32 svc = e->svc, id = e->backend;
    struct eq_rb_svc *rs = bpf_map_lookup_elem(&eq_rb_svc, &svc);
    if (!rs || rs->budget <= 0)
        return 0;
    __s64 *quota = bpf_map_lookup_elem(&eq_rb_quota, &id);
    struct eq_rb_closed *closed = bpf_map_lookup_elem(&eq_rb_closed, &id);
    struct eq_backend *be = bpf_map_lookup_elem(&eq_lb_be, &id);
    if (!quota || !closed || !be)
        return 0;
    __u64 now = bpf_ktime_get_ns();
    __u64 age = now - e->start_ns;
    __u32 reason;
    if (rs->max_age_ns && age >= rs->max_age_ns) {
        reason = EQ_RB_AGE;
    } else {
        if (!(rs->flags & EQ_RB_IDLE))
            return 0;                   /* mode off: only a max age closes */
        reason = eq_gone(be, e) ? EQ_RB_DRAIN : EQ_RB_EXCESS;
        if (reason == EQ_RB_EXCESS && *quota <= 0)
            return 0;                   /* nothing asked of this backend */
        if (age < rs->min_age_ns) {
            BPF_SEQ_PRINTF(ctx->meta->seq, "young\n");   /* wanted later: the agent keeps asking */
            return 0;
        }
        if (!eq_idle(skc, e, now, rs->min_idle_ns)) {
            /* wanted, but busy: the agent walks this namespace again soon */
            BPF_SEQ_PRINTF(ctx->meta->seq, "busy\n");
            return 0;
        }
        if (reason == EQ_RB_EXCESS && __sync_fetch_and_add(quota, -1) <= 0)
            return 0;
    }
    if (__sync_fetch_and_add(&rs->budget, -1) <= 0)
        return 0;                       /* the service's closes for this walk are used up */
    if (reason >= EQ_RB_REASONS)
        return 0;
    __sync_fetch_and_or(&e->flags, EQ_SK_ABORTED);   /* before the close: telemetry sees it at TCP_CLOSE */
    if (bpf_sock_destroy(skc)) {
        __sync_fetch_and_and(&e->flags, ~(__u64)EQ_SK_ABORTED);
        return 0;
    }
    __sync_fetch_and_add(&closed->n[reason], 1);
    BPF_SEQ_PRINTF(ctx->meta->seq, "%u %u %u\n", svc, id, reason);
    return 0;
}
