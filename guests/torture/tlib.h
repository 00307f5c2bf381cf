/*
 * tlib.h - what the torture guests share: IDT gates of their own over the runtime's,
 * exception handlers that skip the faulting instruction, a timer whose every tick folds
 * the interrupted context into an accumulator (an interrupt replayed one instruction off
 * changes the final line), and the final report.
 *
 * Boot arguments: timer_hz=N (default 1000; 0 = no timer), iters=N (each guest's loop
 * count, default its own).
 */
#ifndef TORTURE_TLIB_H
#define TORTURE_TLIB_H

#include "runtime.h"

extern volatile uint64_t t_acc;      /* everything folds into this */
extern volatile uint64_t t_faults;   /* exceptions the skip handlers handled */
extern volatile uint64_t t_traps;    /* INT3 / INT n handled */

/* Handlers in stubs.S.  *_skipN: add N to the saved RIP (the faulting instruction's
 * length), count in t_faults; the error-code variants pop it first. */
extern char t_ud_skip2[], t_ud_nested[], t_de_skip3[], t_gp_skip3[], t_pf_skip3[],
    t_trap_count[], t_ud_skip3[], t_nm_skip3[], t_db_untrap[], t_db_untrap_dr6[], t_db_resume[];

#define T_GATE_INTR 0x8e   /* present, DPL 0, 64-bit interrupt gate: clears IF */
#define T_GATE_TRAP 0x8f   /* present, DPL 0, 64-bit trap gate: keeps IF */

/* Point IDT gate vec at handler (the IDT is the one SIDT names). */
void t_gate(unsigned vec, const void *handler, uint8_t type);
void t_fold(uint64_t v);
/* Program the timer from timer_hz and fold every tick's interrupted frame. */
void t_timer_start(void);
void t_timer_stop(void);
uint64_t t_iters(uint64_t dflt);
/* Print "<name> acc=<hex> faults=<n> traps=<n> ticks=<n>", return 0 for main(). */
int t_finish(const char *name);

#endif
