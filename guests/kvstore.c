/*
 * kvstore - a key-value service on the kvmrr NIC.
 *
 * One rx packet is one request, one tx packet is its reply. Text, fields separated by
 * spaces; one trailing "\n" (and a "\r" before it) is ignored.
 *
 *   <id> GET <key>          -> <id> OK v=<version:8 hex> <value>   |  <id> NOTFOUND
 *   <id> PUT <key> <value>  -> <id> OK t=<clock ns, decimal> v=<version:8 hex>
 *   <id> DEL <key>          -> <id> OK                             |  <id> NOTFOUND
 *   <id> STAT               -> <id> OK n=<entries> h=<store hash:16 hex>
 *   <id> PING               -> <id> OK ticks=<timer ticks> rx=<packets received>
 *   <id> QUIT               -> <id> OK, then the guest exits with code 0
 *   anything malformed      -> <id> ERR <reason>   (id "-" when there is no usable id)
 *
 * <id>: 1..32 printable non-space bytes, echoed back. <key>: 1..64 bytes 0x21-0x7e.
 * <value>: everything after the single space that follows the key, 0..512 arbitrary bytes
 * (spaces included). PUT stamps the entry with the clock port and a new random version
 * from the random port (both logged as PortIn on record). Reasons: empty, bad-id,
 * missing-command, unknown-command, missing-key, bad-key, key-too-long, missing-value,
 * value-too-long, extra-args, full.
 *
 * Store hash: the sum mod 2^64 over all entries of FNV-1a-64(key || 0x00 || value), so it
 * is independent of order, time and versions; 0 for an empty store.
 *
 * Storage: an open-addressing table (4096 slots, linear probing on FNV-1a-64 of the key,
 * backward-shift deletion) pointing into a pool of 3072 entries in .bss (about 1.9 MiB).
 *
 * Boot arguments:
 *   timer_hz=N   housekeeping timer frequency (default 100, 0 = no timer)
 *   log=1        print every request's reply on the serial console
 */
#include "runtime.h"

#define ID_MAX 32
#define KEY_MAX 64
#define VAL_MAX 512
#define SLOTS 4096               /* power of two */
#define MAX_ENTRIES 3072         /* at most 3/4 of SLOTS in use */

#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL

struct entry {
    uint64_t kvhash;   /* FNV-1a-64(key || 0 || value): this entry's part of the store hash */
    uint64_t t_ns;     /* clock port at the last PUT */
    uint32_t version;  /* random port at the last PUT */
    uint16_t klen, vlen;
    char key[KEY_MAX];
    char val[VAL_MAX];
};

struct slot {
    uint64_t h;        /* FNV-1a-64 of the key */
    uint32_t idx;      /* into entries[] */
    uint32_t used;
};

static struct slot slots[SLOTS];
static struct entry entries[MAX_ENTRIES];
static uint32_t free_list[MAX_ENTRIES];
static uint32_t nfree, next_fresh, count;
static uint64_t store_hash;

static char rxbuf[KVMRR_NIC_MTU] __attribute__((aligned(64)));
static char req[KVMRR_NIC_MTU];
static char reply[KVMRR_NIC_MTU];
static int quit, log_replies;
static uint64_t nreq;

static uint64_t fnv1a(uint64_t h, const char *p, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= FNV_PRIME;
    }
    return h;
}

static uint64_t kv_hash(const struct entry *e)
{
    uint64_t h = fnv1a(FNV_OFFSET, e->key, e->klen);
    h *= FNV_PRIME;  /* the 0x00 separator: h ^= 0 is a no-op */
    return fnv1a(h, e->val, e->vlen);
}

/* The slot holding key, or -1 with *empty set to the free slot where it would go. */
static int lookup(const char *key, uint32_t klen, uint64_t h, uint32_t *empty)
{
    uint32_t i = (uint32_t)h & (SLOTS - 1);
    for (;;) {   /* terminates: count <= MAX_ENTRIES < SLOTS leaves a free slot */
        const struct slot *s = &slots[i];
        if (!s->used) {
            *empty = i;
            return -1;
        }
        if (s->h == h) {
            const struct entry *e = &entries[s->idx];
            if (e->klen == klen && memcmp(e->key, key, klen) == 0)
                return (int)i;
        }
        i = (i + 1) & (SLOTS - 1);
    }
}

/* Linear-probing deletion without tombstones: pull later members of the run back. */
static void slot_remove(uint32_t i)
{
    uint32_t j = i;
    for (;;) {
        j = (j + 1) & (SLOTS - 1);
        if (!slots[j].used)
            break;
        uint32_t home = (uint32_t)slots[j].h & (SLOTS - 1);
        /* slots[j] may move to i unless its home lies cyclically in (i, j]. */
        int stays = (i <= j) ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            slots[i] = slots[j];
            i = j;
        }
    }
    slots[i].used = 0;
}

static uint32_t entry_alloc(void)
{
    return nfree ? free_list[--nfree] : next_fresh++;
}

/* ---- request parsing ---- */

struct cursor {
    const char *p;
    uint32_t len, pos;
};

static void skip_spaces(struct cursor *c)
{
    while (c->pos < c->len && c->p[c->pos] == ' ')
        c->pos++;
}

/* The next space-delimited token (after skipping spaces); length 0 at the end. */
static const char *next_token(struct cursor *c, uint32_t *n)
{
    skip_spaces(c);
    uint32_t start = c->pos;
    while (c->pos < c->len && c->p[c->pos] != ' ')
        c->pos++;
    *n = c->pos - start;
    return c->p + start;
}

static int at_end(struct cursor *c)
{
    skip_spaces(c);
    return c->pos == c->len;
}

static int printable(const char *p, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        if ((unsigned char)p[i] < 0x21 || (unsigned char)p[i] > 0x7e)
            return 0;
    return 1;
}

static int is_cmd(const char *tok, uint32_t n, const char *name)
{
    uint32_t l = (uint32_t)strlen(name);
    return n == l && memcmp(tok, name, l) == 0;
}

/* ---- reply building ---- */

struct out {
    char *buf;
    uint32_t n, cap;
};

static void out_mem(struct out *o, const void *p, uint32_t n)
{
    if (n > o->cap - o->n)
        n = o->cap - o->n;
    memcpy(o->buf + o->n, p, n);
    o->n += n;
}

static void out_str(struct out *o, const char *s)
{
    out_mem(o, s, (uint32_t)strlen(s));
}

static void out_fmt(struct out *o, const char *fmt, ...) RT_PRINTF(2, 3);
static void out_fmt(struct out *o, const char *fmt, ...)
{
    if (o->n >= o->cap)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(o->buf + o->n, o->cap - o->n, fmt, ap);
    va_end(ap);
    if (n > 0)
        o->n += ((uint32_t)n < o->cap - o->n) ? (uint32_t)n : o->cap - o->n - 1;
}

static uint32_t err(struct out *o, const char *reason)
{
    out_str(o, " ERR ");
    out_str(o, reason);
    return o->n;
}

/* Handle one request; the reply goes to buf. Returns the reply length. */
static uint32_t handle(const char *p, uint32_t len, char *buf, uint32_t cap)
{
    struct out o = { buf, 0, cap };
    if (len && p[len - 1] == '\n')
        len--;
    if (len && p[len - 1] == '\r')
        len--;
    struct cursor c = { p, len, 0 };

    uint32_t idlen;
    const char *id = next_token(&c, &idlen);
    if (idlen == 0) {
        out_str(&o, "-");
        return err(&o, "empty");
    }
    if (idlen > ID_MAX || !printable(id, idlen)) {
        out_str(&o, "-");
        return err(&o, "bad-id");
    }
    out_mem(&o, id, idlen);

    uint32_t cmdlen;
    const char *cmd = next_token(&c, &cmdlen);
    if (cmdlen == 0)
        return err(&o, "missing-command");

    int get = is_cmd(cmd, cmdlen, "GET"), put = is_cmd(cmd, cmdlen, "PUT");
    int del = is_cmd(cmd, cmdlen, "DEL");
    if (get || put || del) {
        uint32_t klen;
        const char *key = next_token(&c, &klen);
        if (klen == 0)
            return err(&o, "missing-key");
        if (klen > KEY_MAX)
            return err(&o, "key-too-long");
        if (!printable(key, klen))
            return err(&o, "bad-key");
        const char *val = NULL;
        uint32_t vlen = 0;
        if (put) {
            if (c.pos == c.len)
                return err(&o, "missing-value");
            val = c.p + c.pos + 1;        /* after exactly one space */
            vlen = c.len - c.pos - 1;
            if (vlen > VAL_MAX)
                return err(&o, "value-too-long");
        } else if (!at_end(&c)) {
            return err(&o, "extra-args");
        }

        uint64_t h = fnv1a(FNV_OFFSET, key, klen);
        uint32_t empty = 0;
        int si = lookup(key, klen, h, &empty);
        if (get) {
            if (si < 0) {
                out_str(&o, " NOTFOUND");
                return o.n;
            }
            const struct entry *e = &entries[slots[si].idx];
            out_fmt(&o, " OK v=%08x ", e->version);
            out_mem(&o, e->val, e->vlen);
            return o.n;
        }
        if (del) {
            if (si < 0) {
                out_str(&o, " NOTFOUND");
                return o.n;
            }
            uint32_t idx = slots[si].idx;
            store_hash -= entries[idx].kvhash;
            free_list[nfree++] = idx;
            count--;
            slot_remove((uint32_t)si);
            out_str(&o, " OK");
            return o.n;
        }
        /* PUT */
        struct entry *e;
        if (si >= 0) {
            e = &entries[slots[si].idx];
            store_hash -= e->kvhash;
        } else {
            if (count >= MAX_ENTRIES)
                return err(&o, "full");
            uint32_t idx = entry_alloc();
            slots[empty].h = h;
            slots[empty].idx = idx;
            slots[empty].used = 1;
            count++;
            e = &entries[idx];
            memcpy(e->key, key, klen);
            e->klen = (uint16_t)klen;
        }
        memcpy(e->val, val, vlen);
        e->vlen = (uint16_t)vlen;
        e->t_ns = clock_ns();
        e->version = random32();
        e->kvhash = kv_hash(e);
        store_hash += e->kvhash;
        out_fmt(&o, " OK t=%llu v=%08x", (unsigned long long)e->t_ns, e->version);
        return o.n;
    }

    if (!at_end(&c))
        return err(&o, is_cmd(cmd, cmdlen, "STAT") || is_cmd(cmd, cmdlen, "PING")
                           || is_cmd(cmd, cmdlen, "QUIT") ? "extra-args" : "unknown-command");
    if (is_cmd(cmd, cmdlen, "STAT")) {
        out_fmt(&o, " OK n=%u h=%016llx", count, (unsigned long long)store_hash);
    } else if (is_cmd(cmd, cmdlen, "PING")) {
        out_fmt(&o, " OK ticks=%llu rx=%llu", (unsigned long long)timer_ticks,
                (unsigned long long)nic_rx_count);
    } else if (is_cmd(cmd, cmdlen, "QUIT")) {
        quit = 1;
        out_str(&o, " OK");
    } else {
        return err(&o, "unknown-command");
    }
    return o.n;
}

int main(void)
{
    uint64_t hz = bootarg_u64("timer_hz", 100);
    log_replies = bootarg_u64("log", 0) != 0;
    if (hz > 1000000)
        hz = 1000000;

    nic_init(rxbuf, sizeof(rxbuf));
    if (hz)
        timer_set_period_us((uint32_t)(1000000 / hz));
    puts("kvstore ready\n");

    while (!quit) {
        irq_disable();
        while (!nic_rx_pending)
            idle_wait();
        uint32_t len = nic_rx_len;
        if (len > sizeof(req))
            len = sizeof(req);
        memcpy(req, rxbuf, len);
        nic_rx_ack();
        irq_enable();

        uint32_t n = handle(req, len, reply, sizeof(reply));
        nreq++;
        if (log_replies)
            printf("kvstore: %.*s\n", (int)n, reply);
        nic_send(reply, n);
    }

    irq_disable();
    timer_set_period_us(0);
    printf("kvstore bye requests=%llu entries=%u\n", (unsigned long long)nreq, count);
    return 0;
}
