/* A small key/value store guest for wasm-sidecar's snapshot tests.
 *
 * All state lives where a C program keeps it: a linked list of entries on the malloc heap, its
 * head and counters in C globals (.data/.bss in linear memory), and clang's `__stack_pointer`,
 * an internal mutable wasm global that is never exported. A snapshot must capture all of it.
 *
 * Exports (keys are [A-Za-z0-9_.:-], at most 48 bytes; values any bytes):
 *   bump() -> i32                the counter, incremented
 *   put() -> i32                 input "key=value": insert or replace; returns the entry count
 *   get() -> i32                 input "key": output the value; returns its length, or -1
 *   size() -> i32                the entry count
 *   fetch() -> i64               input "key": host_call_async("kv.fetch", {"key": key}); the
 *                                answer (its compact JSON) is stored under the key when it
 *                                arrives; returns the ticket (or the refusal status, < 0)
 *   sidecar_on_response(ticket, status, len)    the async answer, from the sidecar
 *   last_status() -> i32         the status of the last answer (1 before any)
 *   last_ticket() -> i64         the ticket of the last answer (-1 before any)
 *   responses() -> i32           answers received
 *   pending() -> i32             fetches not yet answered
 *   checksum() -> i32            a hash over every key and value, in list order
 *   heap_bytes() -> i32          bytes the entries hold on the heap
 *   stack_top() -> i32           the address of a local on the shadow stack, which clang
 *                                places below `__stack_pointer`: the global's value, seen
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sidecar.h"

#define KEY_MAX 48
#define PENDING_MAX 16

struct entry {
    struct entry *next;
    uint32_t key_len;
    uint32_t value_len;
    char data[]; /* key, then value */
};

struct fetch {
    int64_t ticket; /* -1: free slot */
    uint32_t key_len;
    char key[KEY_MAX];
};

static struct entry *head;
static int32_t entries;
static int32_t counter;
static int32_t heap_bytes_used;
static int32_t answers;
static int32_t status_seen = 1;
static int64_t ticket_seen = -1;
static struct fetch fetches[PENDING_MAX];
static int32_t fetches_ready;

static char *read_input(uint32_t *len) {
    int32_t n = sidecar_input_len();
    char *buf = malloc((size_t)n + 1);
    if (!buf) __builtin_trap();
    sidecar_input_read(buf);
    buf[n] = 0;
    *len = (uint32_t)n;
    return buf;
}

static struct entry **find(const char *key, uint32_t key_len) {
    struct entry **link = &head;
    while (*link && !((*link)->key_len == key_len && memcmp((*link)->data, key, key_len) == 0))
        link = &(*link)->next;
    return link;
}

static void store(const char *key, uint32_t key_len, const char *value, uint32_t value_len) {
    struct entry **link = find(key, key_len);
    struct entry *old = *link;
    struct entry *fresh = malloc(sizeof *fresh + key_len + value_len);
    if (!fresh) __builtin_trap();
    fresh->key_len = key_len;
    fresh->value_len = value_len;
    memcpy(fresh->data, key, key_len);
    memcpy(fresh->data + key_len, value, value_len);
    heap_bytes_used += (int32_t)(key_len + value_len);
    if (old) {
        fresh->next = old->next;
        heap_bytes_used -= (int32_t)(old->key_len + old->value_len);
        free(old);
    } else {
        fresh->next = NULL; /* *link is the end of the list */
        entries++;
    }
    *link = fresh;
}

SIDECAR_EXPORT("bump") int32_t bump(void) { return ++counter; }

SIDECAR_EXPORT("put") int32_t put(void) {
    uint32_t len;
    char *input = read_input(&len);
    char *eq = memchr(input, '=', len);
    if (!eq || eq == input || eq - input > KEY_MAX) __builtin_trap();
    uint32_t key_len = (uint32_t)(eq - input);
    store(input, key_len, eq + 1, len - key_len - 1);
    free(input);
    return entries;
}

SIDECAR_EXPORT("get") int32_t get(void) {
    uint32_t len;
    char *key = read_input(&len);
    struct entry *found = *find(key, len);
    free(key);
    if (!found) return -1;
    sidecar_output_write(found->data + found->key_len, (int32_t)found->value_len);
    return (int32_t)found->value_len;
}

SIDECAR_EXPORT("size") int32_t size(void) { return entries; }

SIDECAR_EXPORT("fetch") int64_t fetch(void) {
    static const char method[] = "kv.fetch";
    char params[KEY_MAX + 16];
    uint32_t len;
    char *key = read_input(&len);
    if (len == 0 || len > KEY_MAX) __builtin_trap();
    memcpy(params, "{\"key\":\"", 8);
    memcpy(params + 8, key, len);
    memcpy(params + 8 + len, "\"}", 2);
    int64_t ticket = sidecar_host_call_async(method, sizeof method - 1, params, (int32_t)(len + 10));
    if (ticket >= 0) {
        if (!fetches_ready) {
            for (int i = 0; i < PENDING_MAX; i++) fetches[i].ticket = -1;
            fetches_ready = 1;
        }
        int slot = 0;
        while (slot < PENDING_MAX && fetches[slot].ticket != -1) slot++;
        if (slot == PENDING_MAX) __builtin_trap();
        fetches[slot].ticket = ticket;
        fetches[slot].key_len = len;
        memcpy(fetches[slot].key, key, len);
    }
    free(key);
    return ticket;
}

SIDECAR_EXPORT("sidecar_on_response") void on_response(int64_t ticket, int32_t status, int32_t len) {
    char *answer = malloc((size_t)len + 1);
    if (!answer) __builtin_trap();
    sidecar_response_read(answer);
    answers++;
    status_seen = status;
    ticket_seen = ticket;
    for (int i = 0; fetches_ready && i < PENDING_MAX; i++) {
        if (fetches[i].ticket == ticket) {
            store(fetches[i].key, fetches[i].key_len, answer, (uint32_t)len);
            fetches[i].ticket = -1;
            break;
        }
    }
    free(answer);
}

SIDECAR_EXPORT("last_status") int32_t last_status(void) { return status_seen; }
SIDECAR_EXPORT("last_ticket") int64_t last_ticket(void) { return ticket_seen; }
SIDECAR_EXPORT("responses") int32_t responses(void) { return answers; }

SIDECAR_EXPORT("pending") int32_t pending(void) {
    int32_t n = 0;
    for (int i = 0; fetches_ready && i < PENDING_MAX; i++) n += fetches[i].ticket != -1;
    return n;
}

SIDECAR_EXPORT("checksum") int32_t checksum(void) {
    uint32_t hash = 2166136261u; /* FNV-1a */
    for (struct entry *e = head; e; e = e->next) {
        for (uint32_t i = 0; i < e->key_len + e->value_len; i++) hash = (hash ^ (uint8_t)e->data[i]) * 16777619u;
        hash = (hash ^ 0xff) * 16777619u;
    }
    return (int32_t)hash;
}

SIDECAR_EXPORT("heap_bytes") int32_t heap_bytes(void) { return heap_bytes_used; }

__attribute__((noinline)) static int32_t address_of(volatile char *p) { return (int32_t)(uintptr_t)p; }

SIDECAR_EXPORT("stack_top") int32_t stack_top(void) {
    volatile char probe[16];
    probe[0] = 1;
    return address_of(probe);
}
