/* The arithmetic of the pick rule: which slots a random u32 draws, and when
 * the second of two backends wins.
 *
 * Mirrored in Python by equilibriumd/datapath/pick.py (SLOT_MASK,
 * SECOND_SHIFT, second_wins), which the simulator and `equilibriumctl pick`
 * use; change both together. The rule itself (eq_pick_once, eq_pick) reads
 * maps, so it lives in lb.bpf.c.
 */
#ifndef EQ_PICK_H
#define EQ_PICK_H

#include "types.h"

/* Both draws come from one bpf_get_prandom_u32(): bits 0.. and 16.. */
#define EQ_SECOND_SHIFT 16

#if EQ_SLOTS > (1 << EQ_SECOND_SHIFT)
#error "EQ_SLOTS must fit in 16 bits: both draws come from one random u32"
#endif

static __always_inline __u32 eq_slot1(__u32 r) { return r & (EQ_SLOTS - 1); }
static __always_inline __u32 eq_slot2(__u32 r) { return (r >> EQ_SECOND_SHIFT) & (EQ_SLOTS - 1); }

/* EQ_SVC_SWEEP: the k-th connect of this CPU to a service of n backends with
 * slots takes the first slot at ((k mod n) + o) * EQ_SLOTS / n, o in [0, 1) the
 * fractional part of (k div n) * EQ_SWEEP_STEP / EQ_SLOTS. Each sweep of n
 * connects samples the table at n points EQ_SLOTS / n apart, so a backend with
 * c slots is first choice c * n / EQ_SLOTS times per sweep, give or take one:
 * with equal weights, exactly once (round robin, which a random draw only
 * matches on average: at 90 % load on single-server backends the random draw's
 * bursts cost the p99 1.5x, in the simulator). The step, ~EQ_SLOTS / golden
 * ratio and odd, moves each sweep's offset to the largest gap left by the
 * previous ones (three-gap theorem), so a backend whose run is shorter than
 * the spacing still gets its share across sweeps. The table itself is
 * unchanged (contiguous runs): n is eq_svc.n_avail. */
#define EQ_SWEEP_STEP 633u

static __always_inline __u32 eq_sweep_slot(__u32 k, __u32 n)
{
    __u32 sweep = k / n, i = k - sweep * n;
    return (i * EQ_SLOTS + ((sweep * EQ_SWEEP_STEP) & (EQ_SLOTS - 1))) / n;
}

/* load2 / share2 < load1 / share1 by more than 1/16, multiplied out (loads are
 * open connections, shares the slots held in the live half). The margin keeps
 * rounding out of it: an even split of 1,024 slots is 342/341/341, and without
 * it the extra slot would decide every pair with equal counts, a standing
 * preference for one backend. */
static __always_inline int eq_second_wins(__u64 load1, __u64 share1, __u64 load2, __u64 share2)
{
    return load2 * share1 * 17 < load1 * share2 * 16;
}

#endif /* EQ_PICK_H */
