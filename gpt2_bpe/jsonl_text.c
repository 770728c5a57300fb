/* The text field of each line of a JSONL block, decoded to UTF-8, in plain C: prepare's other hot loop (after the
 * tokenizer). Python's json.loads costs about as much per byte as tokenizing; this does the common case in a small
 * fraction of that, with the GIL released, and hands every line it is not sure of back to Python.
 *
 * The contract (data_sources.py relies on it; tests/test_jsonl_text.py checks it against json.loads on awkward
 * and random lines): a line gets TEXT only where json.loads(line)[field] is a str holding a character that is not
 * whitespace (str.isspace) and encodable as UTF-8 — and then the text written is exactly that str's UTF-8; BLANK
 * only where Python would skip the line without a word (the line, or the text, all whitespace); ASK_PYTHON for
 * anything else: malformed JSON, a missing or non-string field, a repeated field, invalid UTF-8, lone surrogates,
 * NaN, deep nesting, huge numbers. Python reads those lines itself and says what is wrong with them.
 */
#include <stdint.h>
#include <string.h>

enum { TEXT = 0, BLANK = 1, ASK_PYTHON = 2 };
#define MAX_DEPTH 64     /* deeper values are left to Python */
#define MAX_DIGITS 100   /* longer numbers too (Python refuses ints of over 4300 digits) */

typedef struct {
    const uint8_t *p, *end;  /* the rest of the line */
    uint8_t *out;            /* where the next decoded string goes */
} Cursor;

static int is_json_space(uint8_t c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

static void skip_space(Cursor *c) {
    while (c->p < c->end && is_json_space(*c->p)) c->p++;
}

/* Bytes in the strict UTF-8 sequence at p (no overlongs, no surrogates, at most U+10FFFF), or 0. */
static size_t utf8_sequence(const uint8_t *p, const uint8_t *end) {
    uint8_t b = p[0];
    size_t n = b < 0x80 ? 1 : b >= 0xC2 && b <= 0xDF ? 2 : b >= 0xE0 && b <= 0xEF ? 3 : b >= 0xF0 && b <= 0xF4 ? 4 : 0;
    if (n == 0 || (size_t)(end - p) < n) return 0;
    for (size_t i = 1; i < n; i++)
        if ((p[i] & 0xC0) != 0x80) return 0;
    if ((b == 0xE0 && p[1] < 0xA0) || (b == 0xED && p[1] > 0x9F) || (b == 0xF0 && p[1] < 0x90) ||
        (b == 0xF4 && p[1] > 0x8F)) return 0;
    return n;
}

static int hex4(const uint8_t *p, const uint8_t *end, uint32_t *value) {
    if (end - p < 4) return 0;
    *value = 0;
    for (int i = 0; i < 4; i++) {
        uint8_t h = p[i];
        int digit = h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10
                  : h >= 'A' && h <= 'F' ? h - 'A' + 10 : -1;
        if (digit < 0) return 0;
        *value = *value << 4 | (uint32_t)digit;
    }
    return 1;
}

static uint8_t *put_utf8(uint8_t *o, uint32_t cp) {
    if (cp < 0x80) { *o++ = (uint8_t)cp; return o; }
    if (cp < 0x800) { *o++ = 0xC0 | cp >> 6; }
    else if (cp < 0x10000) { *o++ = 0xE0 | cp >> 12; *o++ = 0x80 | (cp >> 6 & 0x3F); }
    else { *o++ = 0xF0 | cp >> 18; *o++ = 0x80 | (cp >> 12 & 0x3F); *o++ = 0x80 | (cp >> 6 & 0x3F); }
    *o++ = 0x80 | (cp & 0x3F);
    return o;
}

/* The escape after a backslash at c->p (moved past it) into o; NULL where Python should judge it. */
static uint8_t *escape(Cursor *c, uint8_t *o) {
    if (c->p >= c->end) return NULL;
    uint8_t simple = 0;
    switch (*c->p) {  /* a switch, not strchr: "\n" comes every line or so in most texts */
    case '"': simple = '"'; break;
    case '\\': simple = '\\'; break;
    case '/': simple = '/'; break;
    case 'b': simple = '\b'; break;
    case 'f': simple = '\f'; break;
    case 'n': simple = '\n'; break;
    case 'r': simple = '\r'; break;
    case 't': simple = '\t'; break;
    }
    if (simple) { c->p++; *o++ = simple; return o; }
    uint32_t cp, low;
    if (*c->p != 'u' || !hex4(c->p + 1, c->end, &cp)) return NULL;
    c->p += 5;
    if (cp >= 0xDC00 && cp <= 0xDFFF) return NULL;  /* a lone low surrogate */
    if (cp >= 0xD800 && cp <= 0xDBFF) {             /* json.loads pairs it with a directly following low one */
        if (c->end - c->p < 6 || c->p[0] != '\\' || c->p[1] != 'u' || !hex4(c->p + 2, c->end, &low) ||
            low < 0xDC00 || low > 0xDFFF) return NULL;
        c->p += 6;
        cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
    }
    return put_utf8(o, cp);
}

static int plain_ascii(uint8_t b) { return (uint8_t)(b - 0x20) < 0x60 && b != '"' && b != '\\'; }  /* 0x20-0x7F */

#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

/* A high bit in each byte of w that is not plain_ascii (≥ 0x80, < 0x20, '"' or '\\'), in a few word operations: the
 * zero-byte tests of "Bit Twiddling Hacks". Above the first such byte a borrow can mark a plain one too, so only the
 * lowest mark is exact — the only one used. */
static uint64_t special_bytes(uint64_t w) {
    uint64_t quote = w ^ ('"' * ONES), backslash = w ^ ('\\' * ONES);
    return (w & HIGHS) | ((w - 0x20 * ONES) & ~w & HIGHS) | ((quote - ONES) & ~quote & HIGHS) |
           ((backslash - ONES) & ~backslash & HIGHS);
}

/* Copies the run of plain_ascii bytes at p (before end) to *o, moving *o past it; returns the run's end. 8 bytes a
 * step: a word is copied whole (the decoded text is never longer than the JSON read, so o has the room) and the run
 * ends at its first special byte. Locals, not c->p: a store through o could alias that. */
static const uint8_t *plain_run(const uint8_t *p, const uint8_t *end, uint8_t **o_at) {
    uint8_t *o = *o_at;
    uint64_t w, special;
    for (; end - p >= 8; p += 8, o += 8) {
        memcpy(&w, p, 8);
        memcpy(o, &w, 8);
        if ((special = special_bytes(w)) != 0) {  /* little-endian: the first byte is the lowest */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
            size_t plain = (size_t)__builtin_clzll(special) >> 3;  /* there the first byte is the highest */
#else
            size_t plain = (size_t)__builtin_ctzll(special) >> 3;
#endif
            *o_at = o + plain;
            return p + plain;
        }
    }
    while (p < end && plain_ascii(*p)) *o++ = *p++;
    *o_at = o;
    return p;
}

/* The string whose opening quote is at c->p, decoded into c->out; its length, or -1 where Python should judge. */
static int64_t string(Cursor *c) {
    uint8_t *o = c->out;
    for (c->p++; c->p < c->end;) {
        c->p = plain_run(c->p, c->end, &o);  /* most of any text */
        if (c->p == c->end) break;
        uint8_t b = *c->p;
        if (b == '"') { c->p++; return o - c->out; }
        if (b == '\\') {
            c->p++;
            if ((o = escape(c, o)) == NULL) return -1;
        } else if (b < 0x20) {
            return -1;  /* json.loads (strict) refuses control characters in strings */
        } else {
            size_t n = utf8_sequence(c->p, c->end);
            if (n == 0) return -1;
            memcpy(o, c->p, n);
            o += n, c->p += n;
        }
    }
    return -1;  /* no closing quote */
}

static int digits(Cursor *c) {
    const uint8_t *start = c->p;
    while (c->p < c->end && *c->p >= '0' && *c->p <= '9') c->p++;
    return c->p > start;
}

/* A number as json.loads reads one: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][-+]?[0-9]+)? */
static int number(Cursor *c) {
    const uint8_t *start = c->p;
    if (*c->p == '-') c->p++;
    if (c->p < c->end && *c->p == '0') c->p++;
    else if (c->p >= c->end || *c->p < '1' || *c->p > '9' || !digits(c)) return 0;
    if (c->p < c->end && *c->p == '.' && (c->p++, !digits(c))) return 0;
    if (c->p < c->end && (*c->p == 'e' || *c->p == 'E')) {
        c->p++;
        if (c->p < c->end && (*c->p == '+' || *c->p == '-')) c->p++;
        if (!digits(c)) return 0;
    }
    return c->p - start <= MAX_DIGITS;
}

static int value(Cursor *c, int depth);

/* An object or array at c->p, every value in it checked (and its strings decoded into scratch, then dropped). */
static int container(Cursor *c, int depth) {
    uint8_t close = *c->p == '{' ? '}' : ']';
    c->p++;
    skip_space(c);
    if (c->p < c->end && *c->p == close) { c->p++; return 1; }
    for (;;) {
        if (close == '}') {
            if (c->p >= c->end || *c->p != '"' || string(c) < 0) return 0;
            skip_space(c);
            if (c->p >= c->end || *c->p++ != ':') return 0;
            skip_space(c);
        }
        if (!value(c, depth + 1)) return 0;
        skip_space(c);
        if (c->p >= c->end) return 0;
        uint8_t next = *c->p++;
        if (next == close) return 1;
        if (next != ',') return 0;
        skip_space(c);
    }
}

static int literal(Cursor *c, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, word, n) != 0) return 0;
    c->p += n;
    return 1;
}

static int value(Cursor *c, int depth) {
    if (c->p >= c->end || depth > MAX_DEPTH) return 0;
    switch (*c->p) {
    case '"': return string(c) >= 0;
    case '{': case '[': return container(c, depth);
    case 't': return literal(c, "true");
    case 'f': return literal(c, "false");
    case 'n': return literal(c, "null");
    default: return (*c->p == '-' || (*c->p >= '0' && *c->p <= '9')) && number(c);
    }
}

/* Whether text holds a character str.isspace() is false for: 1 yes, 0 no, -1 only Python can tell (all its ASCII
 * is whitespace but it has non-ASCII characters, some of which are whitespace to Python). */
static int has_text(const uint8_t *text, int64_t n) {
    int non_ascii = 0;
    for (int64_t i = 0; i < n; i++) {
        uint8_t b = text[i];
        if (b >= 0x80) non_ascii = 1;
        else if (!(b == ' ' || (b >= '\t' && b <= '\r') || (b >= 0x1C && b <= 0x1F))) return 1;
    }
    return non_ascii ? -1 : 0;
}

static int blank_line(const uint8_t *p, const uint8_t *end) {  /* bytes.isspace(), or empty */
    for (; p < end; p++)
        if (!(*p == ' ' || (*p >= '\t' && *p <= '\r'))) return 0;
    return 1;
}

/* One line: its status, the text (if TEXT) decoded at out, *text_length its length. */
static int line_text(const uint8_t *p, const uint8_t *end, const uint8_t *field, int64_t field_length,
                     uint8_t *out, int64_t *text_length) {
    if (blank_line(p, end)) return BLANK;
    Cursor c = {p, end, out};
    skip_space(&c);
    if (c.p >= c.end || *c.p != '{') return ASK_PYTHON;
    int64_t found = -1;
    for (c.p++, skip_space(&c); c.p < c.end && *c.p != '}';) {
        if (*c.p != '"') return ASK_PYTHON;
        int64_t key_length = string(&c);
        if (key_length < 0) return ASK_PYTHON;
        int is_field = key_length == field_length && memcmp(c.out, field, field_length) == 0;
        skip_space(&c);
        if (c.p >= c.end || *c.p++ != ':') return ASK_PYTHON;
        skip_space(&c);
        if (is_field) {
            if (found >= 0 || c.p >= c.end || *c.p != '"') return ASK_PYTHON;  /* repeated, or not a string */
            c.out = out;
            if ((found = string(&c)) < 0) return ASK_PYTHON;
            c.out = out + found;  /* keep the text: what follows decodes after it */
        } else if (!value(&c, 1)) {
            return ASK_PYTHON;
        }
        skip_space(&c);
        if (c.p < c.end && *c.p == ',') {
            c.p++;
            skip_space(&c);
            if (c.p >= c.end || *c.p != '"') return ASK_PYTHON;  /* a trailing comma */
        }
        else if (c.p >= c.end || *c.p != '}') return ASK_PYTHON;
    }
    if (c.p >= c.end) return ASK_PYTHON;  /* no closing brace */
    c.p++;
    skip_space(&c);
    if (c.p != c.end || found < 0) return ASK_PYTHON;  /* extra data, or no such field */
    *text_length = found;
    int text = has_text(out, found);
    return text == 1 ? TEXT : text == 0 ? BLANK : ASK_PYTHON;
}

/* Every line of block[0:n) (split at '\n'; the last one may lack it): status[i], line_ends[i] (offset just after
 * line i in block) and text_ends[i] (the end of its text in out, the texts back to back; a line without TEXT adds
 * nothing). out must hold n bytes (a decoded string is never longer than its JSON), the arrays max_lines entries.
 * Returns the number of lines, or -1 if there are more than max_lines. */
int64_t jsonl_texts(const uint8_t *block, int64_t n, const uint8_t *field, int64_t field_length, uint8_t *out,
                    int8_t *status, int64_t *line_ends, int64_t *text_ends, int64_t max_lines) {
    int64_t lines = 0, used = 0;
    for (const uint8_t *p = block, *end = block + n; p < end; lines++) {
        if (lines == max_lines) return -1;
        const uint8_t *newline = memchr(p, '\n', end - p), *line_end = newline ? newline + 1 : end;
        int64_t length = 0;
        status[lines] = (int8_t)line_text(p, line_end, field, field_length, out + used, &length);
        used += status[lines] == TEXT ? length : 0;
        line_ends[lines] = line_end - block, text_ends[lines] = used;
        p = line_end;
    }
    return lines;
}
