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
