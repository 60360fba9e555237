/* Addresses of a cgroup sock_addr context, both families in one shape.
 *
 * Every address the datapath stores is four u32 words in network order, IPv4
 * in word 0 and the rest zero (struct eq_backend, struct eq_sock). These
 * helpers move an address between that shape and the context, so each
 * program is written once and built per family with a constant `v6`: after
 * inlining the other family's branch is gone, which the verifier needs
 * (user_ip6 cannot be read from an INET4 program, nor user_ip4 from INET6).
 * After Cilium's ctx_get_v6_address / ctx_set_v6_address.
 *
 * No map access here: bcc rewrites `map.lookup()` only in the main .c file.
 */
#ifndef EQ_ADDR_H
#define EQ_ADDR_H

/* The address the application asked for (connect/sendmsg) or is shown
 * (getpeername/recvmsg). */
static __always_inline void eq_ctx_get_addr(const struct bpf_sock_addr *ctx, int v6, __u32 addr[4])
{
    if (v6) {
        addr[0] = ctx->user_ip6[0];
        addr[1] = ctx->user_ip6[1];
        addr[2] = ctx->user_ip6[2];
        addr[3] = ctx->user_ip6[3];
    } else {
        addr[0] = ctx->user_ip4;
        addr[1] = 0;
        addr[2] = 0;
        addr[3] = 0;
    }
}

/* Rewrite the context's address and port (both in network order). */
static __always_inline void eq_ctx_set_addr(struct bpf_sock_addr *ctx, int v6, const __u32 addr[4], __u16 port)
{
    if (v6) {
        ctx->user_ip6[0] = addr[0];
        ctx->user_ip6[1] = addr[1];
        ctx->user_ip6[2] = addr[2];
        ctx->user_ip6[3] = addr[3];
    } else {
        ctx->user_ip4 = addr[0];
    }
    ctx->user_port = port;
}

static __always_inline void eq_addr_copy(__u32 dst[4], const __u32 src[4])
{
    dst[0] = src[0];
    dst[1] = src[1];
    dst[2] = src[2];
    dst[3] = src[3];
}

/* Word 2 of an IPv4-mapped IPv6 address (::ffff:0:0/96), in network order. */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define EQ_V4MAPPED_W2 0xffff0000u
#else
#define EQ_V4MAPPED_W2 0x0000ffffu
#endif

/* An IPv4-mapped address (what a dual-stack IPv6 socket uses for an IPv4 peer)
 * to the stored IPv4 shape, in place; returns 1 if it was one. */
static __always_inline int eq_unmap(__u32 addr[4])
{
    if (addr[0] != 0 || addr[1] != 0 || addr[2] != EQ_V4MAPPED_W2)
        return 0;
    addr[0] = addr[3];
    addr[2] = 0;
    addr[3] = 0;
    return 1;
}

/* Rewrite the context to `addr` (stored shape), IPv4-mapped again if the
 * application used a mapped address (`mapped`: an IPv6 context). */
static __always_inline void eq_ctx_set_shown(struct bpf_sock_addr *ctx, int v6, int mapped, const __u32 addr[4],
                                             __u16 port)
{
    if (mapped) {
        __u32 m[4] = {0, 0, EQ_V4MAPPED_W2, addr[0]};
        eq_ctx_set_addr(ctx, 1, m, port);
        return;
    }
    eq_ctx_set_addr(ctx, v6, addr, port);
}

#endif /* EQ_ADDR_H */
