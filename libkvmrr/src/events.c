/* events.c - a ring of events whose payloads the queue owns. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

int queue_init(struct event_queue *q, int cap)
{
    q->slots = calloc((size_t)cap, sizeof(*q->slots));
    q->cap = q->slots ? cap : 0;
    q->head = q->count = 0;
    return q->slots ? 0 : -1;
}

void queue_free(struct event_queue *q)
{
    for (int i = 0; i < q->cap; i++)
        free(q->slots[i].payload);
    free(q->slots);
    q->slots = NULL;
    q->cap = q->count = 0;
}

static int queue_grow(struct event_queue *q)
{
    int ncap = q->cap * 2;
    struct event_slot *ns = calloc((size_t)ncap, sizeof(*ns));
    if (!ns)
        return -1;
    for (int i = 0; i < q->cap; i++)
        ns[i] = q->slots[(q->head + i) % q->cap];
    free(q->slots);
    q->slots = ns;
    q->head = 0;
    q->cap = ncap;
    return 0;
}

struct kvmrr_event *queue_push(struct event_queue *q, const struct kvmrr_event *ev,
                               const uint8_t *data, uint32_t len)
{
    if (q->count == q->cap && queue_grow(q) < 0)
        return NULL;
    struct event_slot *s = &q->slots[(q->head + q->count) % q->cap];
    if (len > s->cap) {
        uint8_t *p = realloc(s->payload, len);
        if (!p)
            return NULL;
        s->payload = p;
        s->cap = len;
    }
    s->ev = *ev;
    s->ev.len = len;
    if (len)
        memcpy(s->payload, data, len);
    s->ev.data = len ? s->payload : NULL;
    q->count++;
    return &s->ev;
}

struct kvmrr_event *queue_peek(struct event_queue *q)
{
    return q->count ? &q->slots[q->head].ev : NULL;
}

void queue_pop(struct event_queue *q)
{
    if (!q->count)
        return;
    q->head = (q->head + 1) % q->cap;
    q->count--;
}

void queue_clear(struct event_queue *q)
{
    q->head = q->count = 0;
}

/* A logged event is input from outside (an archive, Kafka): check what the replay will
 * use of it before it is queued.  Whether it matches the guest is the replay's check. */
int event_validate(const struct kvmrr_event *ev, char *err, size_t err_len)
{
    if (ev->kind < KVMRR_EV_INTERRUPT || ev->kind > KVMRR_EV_CHECKSUM)
        return ERRF(err, err_len, "unknown kind %d", ev->kind);
    if (ev->icount < 0)
        return ERRF(err, err_len, "negative icount %lld", (long long)ev->icount);
    bool payload = ev->kind == KVMRR_EV_DMA || ev->kind == KVMRR_EV_OUTPUT;
    if (!payload && ev->len)
        return ERRF(err, err_len, "kind %d carries no payload, this one has %u bytes",
                    ev->kind, ev->len);
    if (ev->len > KVMRR_NIC_MTU)
        return ERRF(err, err_len, "payload of %u bytes is too large (at most %d)", ev->len,
                    KVMRR_NIC_MTU);
    if (ev->len && !ev->data)
        return ERRF(err, err_len, "a %u-byte payload without data", ev->len);
    switch (ev->kind) {
    case KVMRR_EV_INTERRUPT:
        /* 0-31 are the CPU's exceptions; devices raise 32 and up */
        if (ev->a < 32 || ev->a > 255)
            return ERRF(err, err_len, "interrupt vector %llu outside 32..255",
                        (unsigned long long)ev->a);
        break;
    case KVMRR_EV_PORT_IN:
        if (ev->a > 0xffff || (ev->b != 1 && ev->b != 2 && ev->b != 4))
            return ERRF(err, err_len, "port read of port %llu size %llu",
                        (unsigned long long)ev->a, (unsigned long long)ev->b);
        break;
    case KVMRR_EV_MMIO_READ:
        if (ev->b != 1 && ev->b != 2 && ev->b != 4 && ev->b != 8)
            return ERRF(err, err_len, "MMIO read of size %llu", (unsigned long long)ev->b);
        break;
    case KVMRR_EV_OUTPUT:
        if (ev->a != KVMRR_CHANNEL_SERIAL && ev->a != KVMRR_CHANNEL_NIC)
            return ERRF(err, err_len, "output on unknown channel %llu", (unsigned long long)ev->a);
        break;
    }
    return 0;
}
