/*
 * runtime.h - the tiny runtime of the kvmrr guests.
 *
 * The guests run as the only code on one x86-64 vCPU at ring 0 (see kvmrr_abi.h). Every
 * instruction they execute is counted and replayed, so nothing here may depend on anything
 * but guest memory and the ports the ABI marks non-deterministic (clock, random, NIC rx):
 * no RDTSC/RDRAND/RDSEED, no CPUID, no SSE.
 *
 * What _start (start.S) does before main(): zero .bss, check that .bss ends below the
 * stack, install the IDT (vectors 0-31: fault report + exit 0x80+N; 32: timer; 33: NIC
 * rx), parse the boot arguments, call main() with interrupts disabled, and exit with its
 * return value.
 */
#ifndef KVMRR_GUEST_RUNTIME_H
#define KVMRR_GUEST_RUNTIME_H

#include "kvmrr_abi.h"

/* Exit code when the image does not fit in RAM below the stack (see start.S). */
#define RT_EXIT_NOMEM 0x7f
/* Bytes of stack _start insists on between the end of .bss and the top of RAM. */
#define RT_STACK_MIN 0x10000

#ifndef __ASSEMBLER__
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#define RT_NORETURN __attribute__((noreturn))
#define RT_PRINTF(f, a) __attribute__((format(__printf__, f, a)))

/* ---- port I/O ---- */
static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port) : "memory"); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port) : "memory"); }
static inline uint32_t inl(uint16_t port)
{
    uint32_t v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory");
    return v;
}

/* ---- interrupts ---- */
#ifdef RT_HOSTED
/* Host unit tests (guests/test) build workload code against a stub of this runtime. */
void irq_enable(void);
void irq_disable(void);
unsigned long irq_save(void);
void irq_restore(unsigned long flags);
void idle_wait(void);
#else
static inline void irq_enable(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void irq_disable(void) { __asm__ volatile("cli" ::: "memory"); }
/* Disable interrupts and return the previous RFLAGS, for irq_restore(). */
static inline unsigned long irq_save(void)
{
    unsigned long f;
    __asm__ volatile("pushfq; popq %0; cli" : "=r"(f) :: "memory");
    return f;
}
static inline void irq_restore(unsigned long flags)
{
    if (flags & (1ul << 9))
        __asm__ volatile("sti" ::: "memory");
}
/* Call with interrupts disabled: atomically enable them and halt until one is delivered,
 * then disable them again. The caller loops on its condition:
 *     irq_disable(); while (!cond) idle_wait();
 * STI's one-instruction interrupt shadow makes "sti; hlt" race-free. */
static inline void idle_wait(void) { __asm__ volatile("sti; hlt; cli" ::: "memory"); }
#endif /* RT_HOSTED */

/* The interrupted context as the ISR stubs leave it on the stack (lowest address first). */
struct irq_frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8;        /* pushed by the stub */
    uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;           /* pushed by the stub */
    uint64_t vector, error;   /* pushed by the stub; error by the CPU for 8,10-14,17,21,29,30, else 0 */
    uint64_t rip, cs, rflags, rsp, ss;                    /* pushed by the CPU */
};

/* ---- timer (KVMRR_VEC_TIMER) ---- */
/* Ticks seen by the timer ISR since boot (coalesced ticks count once). */
extern volatile uint64_t timer_ticks;
/* Called by the timer ISR after timer_ticks is incremented, with interrupts disabled;
 * timer_frame points at the interrupted context for the duration of the call. */
extern void (*volatile timer_hook)(void);
extern const struct irq_frame *volatile timer_frame;
/* Program the periodic timer; 0 stops it. */
void timer_set_period_us(uint32_t us);

/* ---- non-deterministic inputs (each read is logged by the recorder) ---- */
uint64_t clock_ns(void);   /* host wall clock, ns since the epoch (CLOCK_LO, then CLOCK_HI) */
uint32_t random32(void);   /* 32 random bits */

/* ---- NIC (KVMRR_VEC_NIC_RX) ---- */
/* The rx ISR reads KVMRR_PORT_NIC_RX_LEN; if non-zero it stores the length in nic_rx_len
 * and sets nic_rx_pending. The packet is in the buffer given to nic_init() until
 * nic_rx_ack(), after which the NIC may overwrite it with the next packet. */
extern volatile uint32_t nic_rx_pending;
extern volatile uint32_t nic_rx_len;
extern volatile uint64_t nic_rx_count;  /* packets received since boot */
void nic_init(void *rxbuf, uint32_t cap);  /* rxbuf must lie below 4 GiB */
void nic_rx_ack(void);                      /* clears nic_rx_pending, then acks */
void nic_send(const void *buf, uint32_t len);  /* buf below 4 GiB; copied by the NIC at once */

/* ---- console (KVMRR_PORT_SERIAL, one OUT per byte) ---- */
void putc(char c);
void puts(const char *s);  /* no newline appended */
void print_u64(uint64_t v);
void print_hex(uint64_t v);  /* lowercase, no 0x prefix, no padding */
/* printf subset: %s %c %d %i %u %x %X %p %%, length modifiers l ll z, flags '0' and '-',
 * a decimal field width. %p prints 0x + hex. */
int printf(const char *fmt, ...) RT_PRINTF(1, 2);
int snprintf(char *buf, size_t cap, const char *fmt, ...) RT_PRINTF(3, 4);
int vsnprintf(char *buf, size_t cap, const char *fmt, va_list ap);
int vprintf(const char *fmt, va_list ap);

/* ---- exit (KVMRR_PORT_EXIT) ---- */
RT_NORETURN void kvmrr_exit(int code);

/* ---- boot arguments (struct kvmrr_bootinfo at KVMRR_BOOTINFO_ADDR) ---- */
/* "key=value key2=value2 flag": the value of key, "" for a bare flag, NULL if absent
 * (or if there is no valid bootinfo). The last occurrence of a key wins. */
const char *bootarg(const char *key);
/* The value parsed as decimal or 0x-hex; dflt if absent, empty or malformed. */
unsigned long long bootarg_u64(const char *key, unsigned long long dflt);
/* RAM size from the bootinfo, 0 if there is none. */
uint64_t boot_mem_size(void);

/* ---- string functions (rep movsb/stosb: cheap in counted instructions) ---- */
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);

/* ---- the workload ---- */
int main(void);

/* internal: start.S calls rt_init(), rt_init() calls rt_bootargs_init() */
void rt_init(void);
void rt_bootargs_init(const struct kvmrr_bootinfo *bi);
RT_NORETURN void rt_fault(struct irq_frame *f);
void rt_timer_isr(struct irq_frame *f);
void rt_nic_isr(struct irq_frame *f);

#endif /* !__ASSEMBLER__ */
#endif
