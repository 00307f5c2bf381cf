/*
 * lib.c - the pure part of the guest runtime: formatted output and boot arguments.
 * No port I/O here (console bytes go through putc()), so guests/test can build it on the
 * host against a stub runtime.
 */
#include "runtime.h"

/* ---- formatted output ---- */

struct sink {
    char *buf;      /* NULL: to the console */
    size_t cap;
    size_t n;       /* characters produced (may exceed cap) */
};

static inline void emit(struct sink *s, char c)
{
    if (!s->buf)
        putc(c);
    else if (s->n + 1 < s->cap)
        s->buf[s->n] = c;
    s->n++;
}

static void emit_pad(struct sink *s, char c, int count)
{
    while (count-- > 0)
        emit(s, c);
}

/* Digits of v in base (10 or 16), most significant first, into tmp; returns the count. */
static int utoa(char *tmp, unsigned long long v, unsigned base, int upper)
{
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    char rev[24];
    int n = 0, i;
    do {
        rev[n++] = digits[v % base];
        v /= base;
    } while (v);
    for (i = 0; i < n; i++)
        tmp[i] = rev[n - 1 - i];
    return n;
}

static void format(struct sink *s, const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            emit(s, *fmt);
            continue;
        }
        fmt++;
        int left = 0, zero = 0, width = 0, prec = -1, lng = 0;
        for (;; fmt++) {
            if (*fmt == '-')
                left = 1;
            else if (*fmt == '0')
                zero = 1;
            else
                break;
        }
        if (*fmt == '*') {
            width = va_arg(ap, int);
            if (width < 0) {
                left = 1;
                width = -width;
            }
            fmt++;
        } else {
            while (*fmt >= '0' && *fmt <= '9')
                width = width * 10 + (*fmt++ - '0');
        }
        if (*fmt == '.') {
            fmt++;
            prec = 0;
            if (*fmt == '*') {
                prec = va_arg(ap, int);
                fmt++;
            } else {
                while (*fmt >= '0' && *fmt <= '9')
                    prec = prec * 10 + (*fmt++ - '0');
            }
        }
        for (;; fmt++) {
            if (*fmt == 'l' || *fmt == 'z' || *fmt == 'j' || *fmt == 't')
                lng = 1;
            else if (*fmt != 'h')
                break;
        }

        char tmp[24];
        const char *str = tmp;
        int len = 0, neg = 0, prefix0x = 0;
        unsigned long long u;
        switch (*fmt) {
        case 'd':
        case 'i': {
            long long v = lng ? va_arg(ap, long long) : va_arg(ap, int);
            neg = v < 0;
            u = neg ? -(unsigned long long)v : (unsigned long long)v;
            len = utoa(tmp, u, 10, 0);
            break;
        }
        case 'u':
            u = lng ? va_arg(ap, unsigned long long) : va_arg(ap, unsigned int);
            len = utoa(tmp, u, 10, 0);
            break;
        case 'x':
        case 'X':
            u = lng ? va_arg(ap, unsigned long long) : va_arg(ap, unsigned int);
            len = utoa(tmp, u, 16, *fmt == 'X');
            break;
        case 'p':
            u = (unsigned long long)(uintptr_t)va_arg(ap, void *);
            len = utoa(tmp, u, 16, 0);
            prefix0x = 1;
            break;
        case 'c':
            tmp[0] = (char)va_arg(ap, int);
            len = 1;
            break;
        case 's':
            str = va_arg(ap, const char *);
            if (!str)
                str = "(null)";
            for (len = 0; str[len] && (prec < 0 || len < prec); len++)
                ;
            zero = 0;
            break;
        case '%':
            tmp[0] = '%';
            len = 1;
            width = 0;
            break;
        case '\0':
            return;  /* a lone '%' at the end */
        default:     /* unknown conversion: print it as it stands */
            tmp[0] = '%';
            tmp[1] = *fmt;
            len = 2;
            width = 0;
            break;
        }
        int total = len + neg + 2 * prefix0x;
        int pad = width > total ? width - total : 0;
        if (!left && !zero)
            emit_pad(s, ' ', pad);
        if (neg)
            emit(s, '-');
        if (prefix0x) {
            emit(s, '0');
            emit(s, 'x');
        }
        if (!left && zero)
            emit_pad(s, '0', pad);
        for (int i = 0; i < len; i++)
            emit(s, str[i]);
        if (left)
            emit_pad(s, ' ', pad);
    }
}

int vsnprintf(char *buf, size_t cap, const char *fmt, va_list ap)
{
    struct sink s = { buf, cap, 0 };
    char dummy;
    if (!buf) {          /* measuring only */
        s.buf = &dummy;
        s.cap = 0;
    }
    format(&s, fmt, ap);
    if (cap)
        buf[s.n < cap ? s.n : cap - 1] = '\0';
    return (int)s.n;
}

int snprintf(char *buf, size_t cap, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, cap, fmt, ap);
    va_end(ap);
    return n;
}

int vprintf(const char *fmt, va_list ap)
{
    struct sink s = { NULL, 0, 0 };
    format(&s, fmt, ap);
    return (int)s.n;
}

int printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vprintf(fmt, ap);
    va_end(ap);
    return n;
}

void puts(const char *str)
{
    while (*str)
        putc(*str++);
}

void print_u64(uint64_t v)
{
    char tmp[24];
    int n = utoa(tmp, v, 10, 0);
    for (int i = 0; i < n; i++)
        putc(tmp[i]);
}

void print_hex(uint64_t v)
{
    char tmp[24];
    int n = utoa(tmp, v, 16, 0);
    for (int i = 0; i < n; i++)
        putc(tmp[i]);
}

/* ---- boot arguments ---- */

#define MAX_ARGS 32

static char args_buf[KVMRR_BOOTARGS_MAX];
static const char *arg_key[MAX_ARGS];
static const char *arg_val[MAX_ARGS];
static int nargs;
static uint64_t mem_size;

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

void rt_bootargs_init(const struct kvmrr_bootinfo *bi)
{
    nargs = 0;
    mem_size = 0;
    args_buf[0] = '\0';
    if (!bi || bi->magic != KVMRR_BOOTINFO_MAGIC)
        return;
    mem_size = bi->mem_size;
    int n = 0;
    while (n < KVMRR_BOOTARGS_MAX - 1 && bi->args[n]) {
        args_buf[n] = bi->args[n];
        n++;
    }
    args_buf[n] = '\0';
    /* Split in place: each token "key=value" or "flag" becomes key\0value\0. */
    char *p = args_buf;
    while (*p && nargs < MAX_ARGS) {
        while (is_space(*p))
            *p++ = '\0';
        if (!*p)
            break;
        char *key = p, *val = NULL;
        while (*p && !is_space(*p)) {
            if (*p == '=' && !val) {
                *p = '\0';
                val = p + 1;
            }
            p++;
        }
        if (*p)
            *p++ = '\0';
        arg_key[nargs] = key;
        arg_val[nargs] = val ? val : "";  /* a bare flag has the value "" */
        nargs++;
    }
}

const char *bootarg(const char *key)
{
    for (int i = nargs - 1; i >= 0; i--)  /* the last occurrence wins */
        if (strcmp(arg_key[i], key) == 0)
            return arg_val[i];
    return NULL;
}

unsigned long long bootarg_u64(const char *key, unsigned long long dflt)
{
    const char *s = bootarg(key);
    if (!s || !*s)
        return dflt;
    unsigned long long v = 0;
    unsigned base = 10;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
        if (!*s)
            return dflt;
    }
    for (; *s; s++) {
        unsigned d;
        if (*s >= '0' && *s <= '9')
            d = *s - '0';
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            d = *s - 'a' + 10;
        else if (base == 16 && *s >= 'A' && *s <= 'F')
            d = *s - 'A' + 10;
        else
            return dflt;
        if (v > (~0ULL - d) / base)
            return dflt;  /* overflow */
        v = v * base + d;
    }
    return v;
}

uint64_t boot_mem_size(void)
{
    return mem_size;
}
