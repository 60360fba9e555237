/* Every map of the datapath, declared once and pinned under EQ_PIN_DIR.
 *
 * Both program groups (lb.bpf.c, telemetry.bpf.c) include this header; the
 * maps are BPF_TABLE_PINNED, so whichever object loads first creates and pins
 * a map and the other opens the same pin. Map access code must still live in
 * the main .c files: bcc rewrites `map.lookup()` only there.
 */
#ifndef EQ_MAPS_H
#define EQ_MAPS_H

#include "types.h"

#define EQ_PIN(name) EQ_PIN_DIR "/" #name

/* translation */
BPF_TABLE_PINNED("hash", struct eq_fe4_key, __u32, eq_lb4_fe, EQ_MAX_SERVICES, EQ_PIN(eq_lb4_fe));
BPF_TABLE_PINNED("hash", struct eq_fe6_key, __u32, eq_lb6_fe, EQ_MAX_SERVICES, EQ_PIN(eq_lb6_fe));
BPF_TABLE_PINNED("array", __u32, struct eq_svc, eq_lb_svc, EQ_MAX_SERVICES, EQ_PIN(eq_lb_svc));
BPF_TABLE_PINNED("array", __u32, struct eq_table, eq_lb_slots, EQ_MAX_SERVICES * 2, EQ_PIN(eq_lb_slots));
BPF_TABLE_PINNED("array", __u32, struct eq_backend, eq_lb_be, EQ_MAX_BACKENDS, EQ_PIN(eq_lb_be));
BPF_TABLE_PINNED("lru_hash", struct eq_rev4_key, struct eq_rev4_val, eq_lb4_rev, EQ_MAX_REVNAT, EQ_PIN(eq_lb4_rev));
BPF_TABLE_PINNED("lru_hash", struct eq_rev6_key, struct eq_rev6_val, eq_lb6_rev, EQ_MAX_REVNAT, EQ_PIN(eq_lb6_rev));
/* which reverse entries each live unconnected UDP socket owns: deleted at sock_release
 * (a plain hash: only live sockets hold an entry, and a full map falls back to the LRU;
 * BPF_F_NO_PREALLOC = 1: memory for the sockets that exist, not for EQ_MAX_REVNAT) */
BPF_TABLE_PINNED("hash", __u64, struct eq_revsk, eq_lb_revsk, EQ_MAX_REVNAT, EQ_PIN(eq_lb_revsk), 1);
BPF_TABLE_PINNED("percpu_array", __u32, struct eq_rev_stat, eq_lb_rev_stat, 1, EQ_PIN(eq_lb_rev_stat));
/* Weighted power of two choices: open connections this node holds to each
 * backend id (one shared counter, not per-CPU: a connect compares totals;
 * signed so a late decrement after an id was reused cannot wrap). The slots
 * each backend holds come with the slot it was drawn from (struct eq_table). */
BPF_TABLE_PINNED("array", __u32, __s64, eq_lb_active, EQ_MAX_BACKENDS, EQ_PIN(eq_lb_active));
BPF_TABLE_PINNED("percpu_array", __u32, struct eq_be_stats, eq_lb_be_stat, EQ_MAX_BACKENDS, EQ_PIN(eq_lb_be_stat));
BPF_TABLE_PINNED("percpu_array", __u32, struct eq_svc_errs, eq_lb_svc_err, EQ_MAX_SERVICES, EQ_PIN(eq_lb_svc_err));
/* EQ_SVC_SWEEP: each CPU's connects to each service so far (per CPU: no shared cache line
 * on the connect path; each CPU sweeps on its own, from a random start) */
BPF_TABLE_PINNED("percpu_array", __u32, __u32, eq_lb_cursor, EQ_MAX_SERVICES, EQ_PIN(eq_lb_cursor));
/* admission budgets of punished callers, per (caller cgroup, service): written by the agent,
 * with how many each service has (connect looks budgets up only for a service with any) */
BPF_TABLE_PINNED("array", __u32, __u32, eq_lb_budgeted, EQ_MAX_SERVICES, EQ_PIN(eq_lb_budgeted));
BPF_TABLE_PINNED("hash", struct eq_caller_key, struct eq_budget, eq_lb_budget, EQ_MAX_CALLERS, EQ_PIN(eq_lb_budget));
/* read by equilibriumctl, not by programs */
BPF_TABLE_PINNED("array", __u32, struct eq_svc_name, eq_svc_name, EQ_MAX_SERVICES, EQ_PIN(eq_svc_name));
BPF_TABLE_PINNED("array", __u32, struct eq_meta, eq_meta, 1, EQ_PIN(eq_meta));

/* telemetry */
BPF_TABLE_PINNED("lru_hash", __u64, struct eq_sock, eq_tel_sock, EQ_MAX_SOCKS, EQ_PIN(eq_tel_sock));
BPF_TABLE_PINNED("percpu_array", __u32, struct eq_tel_group, eq_tel_be, EQ_MAX_BACKENDS / EQ_TEL_GROUP,
                 EQ_PIN(eq_tel_be));
/* shared, atomic adds: per-CPU copies of 256 B x 65,536 backends would cost 16 MB per CPU */
BPF_TABLE_PINNED("array", __u32, struct eq_be_hist, eq_tel_hist, EQ_MAX_BACKENDS, EQ_PIN(eq_tel_hist));
BPF_TABLE_PINNED("lru_percpu_hash", struct eq_caller_key, struct eq_caller_val, eq_tel_caller, EQ_MAX_CALLERS,
                 EQ_PIN(eq_tel_caller));
/* what each caller cgroup saw of each backend (BPF_F_MMAPABLE = 1 << 10: the agent maps it) */
BPF_TABLE_PINNED("array", __u32, struct eq_cb, eq_tel_cb, EQ_MAX_BACKENDS, EQ_PIN(eq_tel_cb), 1024);

#endif /* EQ_MAPS_H */
