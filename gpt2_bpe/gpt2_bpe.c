/* GPT-2's tokenizer in plain C: its pre-tokenizer regex written out by hand, byte-pair merges with a heap, and a
 * cache of the pieces already seen. Loaded with ctypes by gpt2_bpe/__init__.py, which checks it against tiktoken.
 *
 * For: `data.py prepare` with the GPT-2 vocabulary, where the tokenizer is the whole cost (tiktoken spends most of
 * its time in a general regex engine running GPT-2's pattern). Not for: trained BPE vocabularies (the tokenizers
 * library), decoding, or any pattern but GPT-2's.
 *
 * The pattern, tried in this order at each position (leftmost-first, as regex alternation is):
 *   's|'t|'re|'ve|'m|'ll|'d | ' ?'\p{L}+ | ' ?'\p{N}+ | ' ?'[^\s\p{L}\p{N}]+ | \s+(?!\S) | \s+
 * and "<|endoftext|>" in the text is id eot_id, the text on each side encoded apart (tiktoken's allowed_special).
 * A piece is its own id when it is a token; else its bytes merge pairwise, lowest rank first (leftmost on ties),
 * exactly tiktoken's byte_pair_merge. The input must be valid UTF-8 (Python's str.encode makes sure of it).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { OTHER = 0, LETTER = 1, NUMBER = 2, SPACE = 3 };  /* the classes the pattern tells apart */

#define N_CODEPOINTS 0x110000
#define TOKEN_SLOTS (1u << 17)  /* open addressing, a power of two over twice GPT-2's 50257 tokens */
#define CACHE_SLOTS (1u << 17)  /* the piece cache: cleared when half full, so lookups stay short */
#define CACHED_MAX 32           /* longer pieces are rare: merged each time, not cached */
#define SCRATCH_KEPT (1u << 16) /* merge scratch for pieces up to this long stays; a longer piece's is freed after */
#define NO_RANK UINT32_MAX

typedef struct { uint64_t hash; uint32_t offset, length; uint32_t value; } TokenSlot;  /* length 0: empty */
typedef struct { uint64_t hash; uint32_t key_offset, ids_offset; uint16_t key_length, n_ids; } CacheSlot;
typedef struct { uint64_t key; uint32_t span; } HeapEntry;  /* key = rank << 32 | start: lowest rank, leftmost */

typedef struct {
    uint8_t *classes;        /* (N_CODEPOINTS,) class of every code point */
    uint8_t *token_bytes;    /* every token's bytes, back to back */
    TokenSlot *tokens;       /* (TOKEN_SLOTS,) bytes -> id (= merge rank) */
    CacheSlot *cache;        /* (CACHE_SLOTS,) piece bytes -> its ids */
    uint8_t *cache_keys;     /* (CACHE_SLOTS / 2 * CACHED_MAX,) */
    uint16_t *cache_ids;     /* (CACHE_SLOTS / 2 * CACHED_MAX,) a piece has at most as many ids as bytes */
    uint32_t cache_count, cache_key_used, cache_ids_used;
    uint32_t *next, *prev;   /* scratch for merging one piece: the parts as a linked list of byte offsets */
    HeapEntry *heap;
    size_t scratch_size;
    uint32_t eot_id;
} Encoder;

static uint64_t hash_bytes(const uint8_t *p, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ n, word;
    for (; n >= 8; p += 8, n -= 8) {
        memcpy(&word, p, 8);
        h = (h ^ word) * 0xff51afd7ed558ccdull;
        h ^= h >> 32;
    }
    word = 0;
    memcpy(&word, p, n);
    h = (h ^ word) * 0xc4ceb9fe1a85ec53ull;
    return h ^ (h >> 29);
}

static uint32_t token_id(const Encoder *e, const uint8_t *p, size_t n) {
    uint64_t h = hash_bytes(p, n);
    for (uint32_t i = (uint32_t)h & (TOKEN_SLOTS - 1);; i = (i + 1) & (TOKEN_SLOTS - 1)) {
        const TokenSlot *s = &e->tokens[i];
        if (s->length == 0) return NO_RANK;
        if (s->hash == h && s->length == n && memcmp(e->token_bytes + s->offset, p, n) == 0) return s->value;
    }
}

/* ----------------------------------------------------------------------------- byte-pair merges of one piece */

static void heap_push(HeapEntry *heap, size_t *size, uint64_t key, uint32_t span) {
    size_t i = (*size)++;
    for (; i > 0 && heap[(i - 1) / 2].key > key; i = (i - 1) / 2) heap[i] = heap[(i - 1) / 2];
    heap[i] = (HeapEntry){key, span};
}

static HeapEntry heap_pop(HeapEntry *heap, size_t *size) {
    HeapEntry top = heap[0], last = heap[--*size];
    size_t i = 0;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= *size) break;
        if (child + 1 < *size && heap[child + 1].key < heap[child].key) child++;
        if (heap[child].key >= last.key) break;
        heap[i] = heap[child];
        i = child;
    }
    heap[i] = last;
    return top;
}

/* Pushes the pair starting at part `start` (it and the part after it), if both exist and form a token. */
static void push_pair(Encoder *e, const uint8_t *p, size_t n, uint32_t start, size_t *heap_size) {
    uint32_t second = e->next[start];
    if (second >= n) return;
    uint32_t end = e->next[second];
    uint32_t rank = token_id(e, p + start, end - start);
    if (rank != NO_RANK) heap_push(e->heap, heap_size, (uint64_t)rank << 32 | start, end - start);
}

static void free_scratch(Encoder *e) {
    free(e->next); free(e->prev); free(e->heap);
    e->next = e->prev = NULL, e->heap = NULL, e->scratch_size = 0;
}

static int grow_scratch(Encoder *e, size_t n) {
    if (n + 1 <= e->scratch_size) return 0;
    size_t size = 2 * (n + 1);
    free_scratch(e);
    e->next = malloc(size * sizeof *e->next);
    e->prev = malloc(size * sizeof *e->prev);
    e->heap = malloc(3 * size * sizeof *e->heap);  /* each merge pushes at most two entries */
    e->scratch_size = e->next && e->prev && e->heap ? size : 0;  /* 0 after a failure: the next call retries */
    return e->scratch_size ? 0 : -1;
}

/* The piece's ids into out (at most n of them); returns how many, or -1 if out of memory. */
static int64_t merge_piece(Encoder *e, const uint8_t *p, size_t n, uint16_t *out) {
    if (grow_scratch(e, n)) return -1;
    for (uint32_t i = 0; i <= n; i++) e->next[i] = i < n ? i + 1 : (uint32_t)n, e->prev[i] = i - 1;
    size_t heap_size = 0;
    for (uint32_t i = 0; i + 1 < n; i++) push_pair(e, p, n, i, &heap_size);
    while (heap_size) {
        HeapEntry best = heap_pop(e->heap, &heap_size);
        uint32_t start = (uint32_t)best.key, second = e->next[start];
        /* stale unless `start` still begins a part whose pair spans exactly what was pushed (spans only grow) */
        if (e->prev[start] == UINT32_MAX - 1 || second >= n || e->next[second] - start != best.span) continue;
        e->next[start] = e->next[second];          /* the two parts become one */
        if (e->next[start] < n) e->prev[e->next[start]] = start;
        e->prev[second] = UINT32_MAX - 1;          /* marks `second` as no longer a part's start */
        if (start > 0) push_pair(e, p, n, e->prev[start], &heap_size);
        push_pair(e, p, n, start, &heap_size);
    }
    int64_t count = 0;
    for (uint32_t i = 0; i < n; i = e->next[i]) out[count++] = (uint16_t)token_id(e, p + i, e->next[i] - i);
    if (e->scratch_size > 2 * (SCRATCH_KEPT + 1)) free_scratch(e);  /* ~24 bytes a byte: not kept for the run */
    return count;
}

/* ----------------------------------------------------------------------------- the piece cache */

static int64_t cached_piece(Encoder *e, const uint8_t *p, size_t n, uint16_t *out) {
    uint64_t h = hash_bytes(p, n);
    uint32_t i = (uint32_t)h & (CACHE_SLOTS - 1);
    for (;; i = (i + 1) & (CACHE_SLOTS - 1)) {
        const CacheSlot *s = &e->cache[i];
        if (s->key_length == 0) break;
        if (s->hash == h && s->key_length == n && memcmp(e->cache_keys + s->key_offset, p, n) == 0) {
            memcpy(out, e->cache_ids + s->ids_offset, s->n_ids * sizeof *out);
            return s->n_ids;
        }
    }
    int64_t count = merge_piece(e, p, n, out);
    if (count < 0) return count;
    if (e->cache_count >= CACHE_SLOTS / 2) {  /* full: start afresh (what is cached never changes an id) */
        memset(e->cache, 0, CACHE_SLOTS * sizeof *e->cache);
        e->cache_count = e->cache_key_used = e->cache_ids_used = 0;
        return count;  /* the slot found above belonged to the old table */
    }
    e->cache[i] = (CacheSlot){h, e->cache_key_used, e->cache_ids_used, (uint16_t)n, (uint16_t)count};
    memcpy(e->cache_keys + e->cache_key_used, p, n);
    memcpy(e->cache_ids + e->cache_ids_used, out, count * sizeof *out);
    e->cache_count++, e->cache_key_used += n, e->cache_ids_used += count;
    return count;
}

static int64_t encode_piece(Encoder *e, const uint8_t *p, size_t n, uint16_t *out) {
    uint32_t id = token_id(e, p, n);  /* most pieces are one token: tiktoken checks this first too */
    if (id != NO_RANK) {
        out[0] = (uint16_t)id;
        return 1;
    }
    return n <= CACHED_MAX ? cached_piece(e, p, n, out) : merge_piece(e, p, n, out);
}

/* ----------------------------------------------------------------------------- the pre-tokenizer */

/* The class of the character at p[i] (valid UTF-8), and its length in bytes. */
static inline int class_at(const Encoder *e, const uint8_t *p, size_t i, size_t *length) {
    uint32_t b = p[i], cp;
    if (b < 0x80) *length = 1, cp = b;
    else if (b < 0xE0) *length = 2, cp = (b & 0x1F) << 6 | (p[i + 1] & 0x3F);
    else if (b < 0xF0) *length = 3, cp = (b & 0x0F) << 12 | (p[i + 1] & 0x3F) << 6 | (p[i + 2] & 0x3F);
    else *length = 4, cp = (b & 0x07) << 18 | (p[i + 1] & 0x3F) << 12 | (p[i + 2] & 0x3F) << 6 | (p[i + 3] & 0x3F);
    return e->classes[cp];
}

/* Where the piece starting at p[i] ends (p[0..n) is a text without <|endoftext|>). */
static size_t piece_end(const Encoder *e, const uint8_t *p, size_t n, size_t i) {
    size_t length, next_length;
    if (p[i] == '\'' && i + 1 < n) {  /* the contractions, before anything else */
        uint8_t c1 = p[i + 1], c2 = i + 2 < n ? p[i + 2] : 0;
        if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return i + 2;
        if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) return i + 3;
    }
    int cls = class_at(e, p, i, &length);
    size_t j = i;
    if (p[i] == ' ' && i + 1 < n) {  /* ' ?X+': a space joins the run of letters, digits or others after it */
        int next_cls = class_at(e, p, i + 1, &next_length);
        if (next_cls != SPACE) cls = next_cls, j = i + 1, length = next_length;
    }
    if (cls != SPACE) {
        for (j += length; j < n && class_at(e, p, j, &length) == cls; j += length) {}
        return j;
    }
    size_t last = i;  /* whitespace: the run, less its last character if something follows (\s+(?!\S)) */
    for (j = i; j < n && class_at(e, p, j, &length) == SPACE; j += length) last = j;
    return j == n || last == i ? j : last;  /* a single whitespace before text stands alone (\s+) */
}

static int64_t encode_text(Encoder *e, const uint8_t *p, size_t n, uint16_t *out) {
    int64_t count = 0;
    for (size_t i = 0, end; i < n; i = end) {
        end = piece_end(e, p, n, i);
        int64_t got = encode_piece(e, p + i, end - i, out + count);
        if (got < 0) return got;
        count += got;
    }
    return count;
}

/* ----------------------------------------------------------------------------- the API ctypes calls */

static const char EOT_TEXT[] = "<|endoftext|>";

/* text's ids into out, which must hold n entries (a text of n bytes never has more ids); returns how many,
 * or -1 if out of memory. Safe to call from many threads at once only with one Encoder per thread. */
int64_t gpt2_bpe_encode(Encoder *e, const uint8_t *text, int64_t n, uint16_t *out) {
    const size_t eot_length = sizeof EOT_TEXT - 1;
    int64_t count = 0;
    size_t start = 0;
    for (size_t i = 0; i < (size_t)n; i++) {
        const uint8_t *hit = memchr(text + i, '<', n - i);
        if (hit == NULL) break;
        i = hit - text;
        if (n - i < eot_length || memcmp(hit, EOT_TEXT, eot_length) != 0) continue;
        int64_t got = encode_text(e, text + start, i - start, out + count);
        if (got < 0) return got;
        count += got;
        out[count++] = (uint16_t)e->eot_id;
        start = i + eot_length, i = start - 1;
    }
    int64_t got = encode_text(e, text + start, n - start, out + count);
    return got < 0 ? got : count + got;
}

/* Several texts, text t being buffer[starts[t]:ends[t]], encoded one after another with eot_id between them: the
 * ids of the texts joined by "<|endoftext|>" (the separator splits the joined text exactly there: it begins with
 * '<', which no suffix of "<|endoftext|>" but the whole does), without joining them. out must hold the texts'
 * bytes plus n_texts ids. The number of ids, or -1 if out of memory. */
int64_t gpt2_bpe_encode_spans(Encoder *e, const uint8_t *buffer, const int64_t *starts, const int64_t *ends,
                              int64_t n_texts, uint16_t *out) {
    int64_t count = 0;
    for (int64_t t = 0; t < n_texts; t++) {
        if (t > 0) out[count++] = (uint16_t)e->eot_id;
        int64_t got = gpt2_bpe_encode(e, buffer + starts[t], ends[t] - starts[t], out + count);
        if (got < 0) return got;
        count += got;
    }
    return count;
}

void gpt2_bpe_free(Encoder *e) {
    if (e == NULL) return;
    free(e->classes); free(e->token_bytes); free(e->tokens); free(e->cache); free(e->cache_keys);
    free(e->cache_ids); free(e->next); free(e->prev); free(e->heap);
    free(e);
}

/* An encoder for the tokens whose bytes are token_bytes[offsets[i]:offsets[i + 1]] (id = rank = i), classes the
 * (N_CODEPOINTS,) class table; both are copied. NULL if out of memory. */
Encoder *gpt2_bpe_new(const uint8_t *token_bytes, const uint32_t *offsets, uint32_t n_tokens,
                      const uint8_t *classes, uint32_t eot_id) {
    Encoder *e = calloc(1, sizeof *e);
    if (e == NULL) return NULL;
    e->eot_id = eot_id;
    e->classes = malloc(N_CODEPOINTS);
    e->token_bytes = malloc(offsets[n_tokens] + 1);
    e->tokens = calloc(TOKEN_SLOTS, sizeof *e->tokens);
    e->cache = calloc(CACHE_SLOTS, sizeof *e->cache);
    e->cache_keys = malloc(CACHE_SLOTS / 2 * CACHED_MAX);
    e->cache_ids = malloc(CACHE_SLOTS / 2 * CACHED_MAX * sizeof *e->cache_ids);
    if (!e->classes || !e->token_bytes || !e->tokens || !e->cache || !e->cache_keys || !e->cache_ids ||
        n_tokens >= TOKEN_SLOTS / 2 || grow_scratch(e, 256)) {
        gpt2_bpe_free(e);
        return NULL;
    }
    memcpy(e->classes, classes, N_CODEPOINTS);
    memcpy(e->token_bytes, token_bytes, offsets[n_tokens]);
    for (uint32_t id = 0; id < n_tokens; id++) {
        uint32_t offset = offsets[id], length = offsets[id + 1] - offset;
        uint64_t h = hash_bytes(token_bytes + offset, length);
        uint32_t i = (uint32_t)h & (TOKEN_SLOTS - 1);
        while (e->tokens[i].length != 0) i = (i + 1) & (TOKEN_SLOTS - 1);
        e->tokens[i] = (TokenSlot){h, offset, length, id};
    }
    return e;
}
