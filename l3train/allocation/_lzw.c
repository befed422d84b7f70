/* Fast LZW codeword counting for l3train.allocation.lzw (see that module for the why).
 *
 * The dictionary is a trie: node ids 0..V-1 are the single tokens (token id == node id),
 * every later node is one n-gram, numbered in insertion order, stored as (parent node,
 * last token, count). Children are found through one open-addressing hash table whose
 * identity key is parent * V + token, so there are no string keys anywhere.
 *
 * Speed comes from memory latency, not arithmetic: nearly every step of the scan is a
 * lookup in a table far larger than the caches. Three things hide that latency:
 * - An n-gram's slot is chosen by a rolling hash of its *content* (not of its parent's
 *   node id), so the slots of the next few extensions of the current phrase are known
 *   from the tokens alone and are prefetched before the walk reaches them.
 * - A one-byte tag per slot (a few MB, mostly cache resident) answers most probes for
 *   absent n-grams -- one per phrase -- without touching the 16-byte slots.
 * - Count updates are queued a few phrases deep and their cache lines prefetched when
 *   queued (the scan itself never reads counts, and the queue keeps their order).
 * Large tables are also placed on transparent huge pages where Linux offers them.
 *
 * lzw_scan reproduces the paper's reference loop exactly, quirks included; the comments
 * inside it map each step to that loop (docs/allocation.md, Algorithm 1).
 */
#define _DEFAULT_SOURCE /* posix_memalign, madvise under -std=c99 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define LOOKAHEAD 4
#define PENDING_UPDATES 16
#define HUGE_PAGE ((size_t)1 << 21)

typedef struct {
    uint64_t key;     /* parent * vocab_size + token */
    uint32_t node;
    uint32_t hash_hi; /* top half of the content hash: the home slot and the tag */
} lzw_slot;

typedef struct {
    int64_t vocab_size;
    int64_t num_nodes;
    int64_t node_capacity;
    int64_t *parent;
    int32_t *last_token;
    int64_t *count;
    lzw_slot *slots;
    uint8_t *tags;      /* 0: empty slot, else 0x80 | 7 hash bits */
    uint64_t num_slots; /* a power of two, at most 2**32; n-grams fill at most 3/4 */
    int slot_bits;
} lzw_trie;

typedef struct {
    int64_t node;
    int reset; /* set the count to 1 instead of adding 1 */
} count_update;

typedef struct {
    count_update items[PENDING_UPDATES];
    uint64_t queued; /* total ever queued; the last min(queued, PENDING_UPDATES) wait */
} update_queue;

static void *alloc_large(size_t bytes) {
    if (bytes < HUGE_PAGE) return malloc(bytes);
    void *memory = NULL;
    if (posix_memalign(&memory, HUGE_PAGE, bytes)) return NULL;
#ifdef MADV_HUGEPAGE
    madvise(memory, bytes, MADV_HUGEPAGE); /* only a hint: failure is harmless */
#endif
    return memory;
}

/* Content hash of an n-gram: fold its tokens in order (a single token t hashes to
 * extend_hash(0, t)). Only the top 32 bits are used. */
static inline uint64_t extend_hash(uint64_t hash, int32_t token) {
    return (hash + (uint64_t)token + 1) * 0x9E3779B97F4A7C15ULL;
}

static inline uint64_t home_slot(const lzw_trie *trie, uint32_t hash_hi) {
    return hash_hi >> (32 - trie->slot_bits);
}

/* Tag bits mix all of hash_hi, so they are not just the slot position again. */
static inline uint8_t tag_of(uint32_t hash_hi) {
    return (uint8_t)(0x80 | ((hash_hi * 0x9E3779B1u) >> 25));
}

/* Index of the slot holding `key`, or of the empty slot where it would go. */
static inline uint64_t find_slot(const lzw_trie *trie, uint32_t hash_hi, uint64_t key) {
    const uint64_t mask = trie->num_slots - 1;
    const uint8_t tag = tag_of(hash_hi);
    uint64_t i = home_slot(trie, hash_hi);
    for (;;) {
        uint8_t found_tag = trie->tags[i];
        if (found_tag == 0 || (found_tag == tag && trie->slots[i].key == key)) return i;
        i = (i + 1) & mask;
    }
}

/* Move the hash table to 2**slot_bits slots. The old table is walked in slot order and
 * the home slot is the top bits of hash_hi, so the new table is written nearly
 * sequentially instead of at random. */
static int resize_slots(lzw_trie *trie, int slot_bits) {
    lzw_slot *old_slots = trie->slots;
    uint8_t *old_tags = trie->tags;
    uint64_t old_num_slots = trie->num_slots;
    uint64_t num_slots = (uint64_t)1 << slot_bits;
    lzw_slot *slots = alloc_large(num_slots * sizeof(lzw_slot));
    uint8_t *tags = alloc_large(num_slots);
    if (!slots || !tags) {
        free(slots);
        free(tags);
        return -1;
    }
    memset(tags, 0, num_slots);
    trie->slots = slots;
    trie->tags = tags;
    trie->num_slots = num_slots;
    trie->slot_bits = slot_bits;
    for (uint64_t old = 0; old < old_num_slots; old++) {
        if (old_tags[old] == 0) continue;
        uint64_t i = find_slot(trie, old_slots[old].hash_hi, old_slots[old].key);
        tags[i] = old_tags[old];
        slots[i] = old_slots[old];
    }
    free(old_slots);
    free(old_tags);
    return 0;
}

static int grow_nodes(lzw_trie *trie, int64_t capacity) {
    int64_t *parent = realloc(trie->parent, capacity * sizeof(int64_t));
    if (!parent) return -1;
    trie->parent = parent;
    int32_t *last_token = realloc(trie->last_token, capacity * sizeof(int32_t));
    if (!last_token) return -1;
    trie->last_token = last_token;
    int64_t *count = realloc(trie->count, capacity * sizeof(int64_t));
    if (!count) return -1;
    trie->count = count;
    trie->node_capacity = capacity;
    return 0;
}

void lzw_free(lzw_trie *trie) {
    if (!trie) return;
    free(trie->parent);
    free(trie->last_token);
    free(trie->count);
    free(trie->slots);
    free(trie->tags);
    free(trie);
}

lzw_trie *lzw_create(int64_t vocab_size) {
    lzw_trie *trie = calloc(1, sizeof(lzw_trie));
    if (!trie) return NULL;
    trie->vocab_size = vocab_size;
    if (grow_nodes(trie, vocab_size + 1024)) {
        lzw_free(trie);
        return NULL;
    }
    for (int64_t t = 0; t < vocab_size; t++) {
        trie->parent[t] = -1;
        trie->last_token[t] = (int32_t)t;
        trie->count[t] = 0;
    }
    trie->num_nodes = vocab_size;
    if (resize_slots(trie, 12)) {
        lzw_free(trie);
        return NULL;
    }
    return trie;
}

/* Append the n-gram (prefix, token), absent from the table; `slot` is where its lookup
 * ended. Returns 0, -1 when out of memory, -2 when node ids would not fit 32 bits. */
static int insert(lzw_trie *trie, uint64_t slot, uint64_t key, uint32_t hash_hi, int64_t prefix,
                  int32_t token) {
    if (trie->num_nodes == UINT32_MAX) return -2;
    if (trie->num_nodes == trie->node_capacity && grow_nodes(trie, 2 * trie->node_capacity)) return -1;
    int64_t node = trie->num_nodes++;
    trie->parent[node] = prefix;
    trie->last_token[node] = token;
    trie->count[node] = 1;
    trie->tags[slot] = tag_of(hash_hi);
    trie->slots[slot].key = key;
    trie->slots[slot].node = (uint32_t)node;
    trie->slots[slot].hash_hi = hash_hi;
    uint64_t num_ngrams = (uint64_t)(trie->num_nodes - trie->vocab_size);
    if (4 * num_ngrams <= 3 * trie->num_slots) return 0;
    return trie->slot_bits == 32 ? -2 : resize_slots(trie, trie->slot_bits + 1);
}

static inline void apply_update(lzw_trie *trie, count_update update) {
    if (update.reset) {
        trie->count[update.node] = 1;
    } else {
        trie->count[update.node] += 1;
    }
}

static inline void queue_update(lzw_trie *trie, update_queue *queue, int64_t node, int reset) {
    __builtin_prefetch(&trie->count[node], 1);
    count_update *item = &queue->items[queue->queued % PENDING_UPDATES];
    if (queue->queued >= PENDING_UPDATES) apply_update(trie, *item);
    item->node = node;
    item->reset = reset;
    queue->queued++;
}

static void flush_updates(lzw_trie *trie, update_queue *queue) {
    uint64_t first = queue->queued > PENDING_UPDATES ? queue->queued - PENDING_UPDATES : 0;
    for (uint64_t i = first; i < queue->queued; i++) {
        apply_update(trie, queue->items[i % PENDING_UPDATES]);
    }
    queue->queued = 0;
}

/* Add the unigram counts of `tokens` to `frequencies`, checking 0 <= id < vocab_size.
 * Returns the index of the first invalid token (the counts are then partial), or -1. */
int64_t lzw_count_tokens(const int32_t *tokens, int64_t num_tokens, int64_t vocab_size,
                         int64_t *frequencies) {
    for (int64_t i = 0; i < num_tokens; i++) {
        if (tokens[i] < 0 || tokens[i] >= vocab_size) return i;
        frequencies[tokens[i]]++;
    }
    return -1;
}

/* Scan `num_docs` documents; document d is tokens[offsets[d]:offsets[d+1]]. Token ids must
 * already be valid (lzw_count_tokens). Returns 0, or on failure (the dictionary then holds
 * part of the scan and must be discarded) -1 when out of memory, -2 when the dictionary
 * outgrows 32-bit node ids. */
int lzw_scan(lzw_trie *trie, const int32_t *tokens, const int64_t *offsets, int64_t num_docs) {
    const uint64_t vocab_size = (uint64_t)trie->vocab_size;
    update_queue queue = {.queued = 0};
    for (int64_t d = 0; d < num_docs; d++) {
        const int32_t *toks = tokens + offsets[d];
        const int64_t n = offsets[d + 1] - offsets[d];
        /* Reference: `last, cur = 0, 1; while cur < len(toks)`. A document's last token
         * that would start a phrase is never looked at (quirk c). */
        int64_t last = 0;
        while (last + 1 < n) {
            /* The reference's inner loop always accepts toks[last:last+1] (every single
             * token is in the dictionary), so the walk starts from that node with
             * cur = last + 2. Invariant: `prefix` is the node of toks[last:cur-1]. */
            int64_t prefix = toks[last];
            uint64_t hash = extend_hash(0, toks[last]);
            int64_t cur = last + 2;
            int64_t ahead = last + 1;
            uint64_t ahead_hash = hash; /* hash of toks[last:ahead] */
            uint64_t key, slot;
            int found;
            for (;;) {
                int64_t ahead_end = cur + LOOKAHEAD < n ? cur + LOOKAHEAD : n;
                for (; ahead < ahead_end; ahead++) {
                    ahead_hash = extend_hash(ahead_hash, toks[ahead]);
                    uint64_t ahead_slot = home_slot(trie, (uint32_t)(ahead_hash >> 32));
                    __builtin_prefetch(&trie->tags[ahead_slot]);
                    __builtin_prefetch(&trie->slots[ahead_slot]);
                }
                /* Reference: `tuple(toks[last:cur]) in counts`. */
                hash = extend_hash(hash, toks[cur - 1]);
                key = (uint64_t)prefix * vocab_size + (uint64_t)toks[cur - 1];
                slot = find_slot(trie, (uint32_t)(hash >> 32), key);
                found = trie->tags[slot] != 0;
                /* At cur == n the reference stops extending without this lookup, then
                 * sets toks[last:n] to 1: inserted, or reset if it exists (quirk b). */
                if (!found || cur == n) break;
                prefix = trie->slots[slot].node;
                cur++;
            }
            /* Reference: `counts[toks[last:cur-1]] += 1; counts[toks[last:cur]] = 1`. */
            queue_update(trie, &queue, prefix, 0);
            if (found) {
                queue_update(trie, &queue, trie->slots[slot].node, 1);
            } else {
                int status = insert(trie, slot, key, (uint32_t)(hash >> 32), prefix, toks[cur - 1]);
                if (status) return status;
            }
            /* Reference: `last = cur; cur += 1` -- the token that broke the match is part
             * of the new n-gram and never starts the next phrase (quirk a). */
            last = cur;
        }
    }
    flush_updates(trie, &queue);
    return 0;
}

int64_t lzw_num_nodes(const lzw_trie *trie) { return trie->num_nodes; }

/* Copy the dictionary out, in node id (= insertion) order. */
void lzw_export(const lzw_trie *trie, int64_t *count, int64_t *parent, int64_t *last_token) {
    for (int64_t i = 0; i < trie->num_nodes; i++) {
        count[i] = trie->count[i];
        parent[i] = trie->parent[i];
        last_token[i] = trie->last_token[i];
    }
}
