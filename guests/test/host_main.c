/*
 * host_main.c - host test driver for the guest runtime library and kvstore.
 *
 *   kvstore_host kvstore ["bootargs"]   run kvstore's main() on the stub NIC (stdin/stdout)
 *   kvstore_host fmt                    compare the runtime's snprintf with libc's
 *   kvstore_host bootargs "<args>" key...   print bootarg()/bootarg_u64() of each key
 *
 * fmt and bootargs print "<n> passed, <m> failed" / the looked-up values.
 */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "kvmrr_abi.h"

/* The renamed runtime entry points (see HOST_RENAMES in the Makefile). */
int rt_snprintf(char *buf, size_t cap, const char *fmt, ...);
int rt_printf(const char *fmt, ...);
void rt_bootargs_init(const struct kvmrr_bootinfo *bi);
const char *bootarg(const char *key);
unsigned long long bootarg_u64(const char *key, unsigned long long dflt);
uint64_t boot_mem_size(void);
int kvstore_main(void);

static struct kvmrr_bootinfo bi;

static void set_args(const char *args)
{
    memset(&bi, 0, sizeof(bi));
    bi.magic = KVMRR_BOOTINFO_MAGIC;
    bi.mem_size = 16u << 20;
    snprintf(bi.args, sizeof(bi.args), "%s", args);
    rt_bootargs_init(&bi);
}

static int passed, failed;

#define CHECK_FMT(cap, ...)                                                           \
    do {                                                                              \
        char a[128], b[128];                                                          \
        memset(a, 'Z', sizeof(a));                                                    \
        memset(b, 'Z', sizeof(b));                                                    \
        int na = rt_snprintf(a, cap, __VA_ARGS__);                                    \
        int nb = snprintf(b, cap, __VA_ARGS__);                                       \
        if (na == nb && memcmp(a, b, sizeof(a)) == 0) {                               \
            passed++;                                                                 \
        } else {                                                                      \
            failed++;                                                                 \
            printf("FAIL %s: got %d \"%s\", want %d \"%s\"\n", #__VA_ARGS__, na, a,   \
                   nb, b);                                                            \
        }                                                                             \
    } while (0)

static int test_fmt(void)
{
    CHECK_FMT(128, "plain");
    CHECK_FMT(128, "%d %d %d", 0, -1, 2147483647);
    CHECK_FMT(128, "%i|%5d|%-5d|%05d", -2147483647 - 1, 42, 42, -42);
    CHECK_FMT(128, "%u %x %X %08x", 4294967295u, 0xdeadbeefu, 0xabcdefu, 0x1fu);
    CHECK_FMT(128, "%lu %lx %ld", 18446744073709551615ul, 0x123456789abcdeful, -5l);
    CHECK_FMT(128, "%llu %llx %lld %016llx", 18446744073709551615ull, 0ull,
              -9223372036854775807ll - 1, 0xabcull);
    CHECK_FMT(128, "%zu %zx", (size_t)12345, (size_t)0xfff);
    CHECK_FMT(128, "%s|%10s|%-10s|%.3s|%.*s|%c%c", "abc", "right", "left", "truncate",
              2, "xyz", 'q', '!');
    CHECK_FMT(128, "%%|100%%");
    CHECK_FMT(128, "%*d|%-*d|", 6, 12, 6, 12);
    CHECK_FMT(128, "%hu %hhx", 65535, 255);
    CHECK_FMT(5, "%s", "truncated output");
    CHECK_FMT(1, "%d", 12345);
    CHECK_FMT(0, "%d", 12345);
    {   /* %p: ours is always 0x + hex, like glibc for non-NULL pointers */
        char a[64], b[64];
        rt_snprintf(a, sizeof(a), "%p", (void *)0x1234abcd);
        snprintf(b, sizeof(b), "%p", (void *)0x1234abcd);
        if (strcmp(a, b) == 0)
            passed++;
        else {
            failed++;
            printf("FAIL %%p: %s vs %s\n", a, b);
        }
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "fmt") == 0)
        return test_fmt();
    if (argc >= 3 && strcmp(argv[1], "bootargs") == 0) {
        set_args(argv[2]);
        printf("mem_size=%llu\n", (unsigned long long)boot_mem_size());
        for (int i = 3; i < argc; i++) {
            const char *v = bootarg(argv[i]);
            printf("%s: %s%s%s u64=%llu\n", argv[i], v ? "\"" : "", v ? v : "NULL",
                   v ? "\"" : "", bootarg_u64(argv[i], 777));
        }
        return 0;
    }
    if (argc >= 2 && strcmp(argv[1], "kvstore") == 0) {
        set_args(argc >= 3 ? argv[2] : "");
        int rc = kvstore_main();
        fflush(stdout);
        return rc;
    }
    fprintf(stderr, "usage: %s fmt | bootargs ARGS KEY... | kvstore [ARGS]\n", argv[0]);
    return 64;
}
