/* ring.h - a fixed-size ring buffer used by the corpus builder tests. */
#ifndef DEMO_RING_H
#define DEMO_RING_H

#include <stddef.h>

struct ring {
	unsigned char *data;
	size_t head;
	size_t tail;
	size_t size;
};

int ring_init(struct ring *r, size_t size);
size_t ring_push(struct ring *r, const void *buf, size_t len);
size_t ring_pop(struct ring *r, void *buf, size_t len);

#endif /* DEMO_RING_H */
