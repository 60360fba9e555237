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
