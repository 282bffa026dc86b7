/* Unicode deltas between the libraries deltaserve links and the ones HF `tokenizers` was built with.
 *
 * HF tokenizers (0.23) matches its pre-tokenizer regexes with Oniguruma and its Digits / added-token
 * checks with Rust's std and `regex` crate, all on Unicode 16 tables. Debian's PCRE2 10.42 and
 * utf8proc 2.6 know Unicode 14 (and PCRE2 also counts U+180E as \s). The ranges below are every code
 * point the HF side classifies as letter / number / numeric / word character and ours does not,
 * measured exhaustively over U+0001..U+10FFFF; there were none the other way round. Newer system
 * libraries make these redundant, never wrong: each class is used as a union with the library's own.
 * tests/golden/gen_tokenizer_golden.py records HF's classes (tests/data/tokenizer/unicode_classes.json)
 * and test_tokenizer_unicode.c checks every code point, naming any that a library change moves. */
#include "tokenizer/tok_internal.h"

static const tok_range k_extra_letter[] = {
    {0x1C89, 0x1C8A},   {0xA7CB, 0xA7CD},   {0xA7DA, 0xA7DC},   {0x105C0, 0x105F3}, {0x10D4A, 0x10D65},
    {0x10D6F, 0x10D85}, {0x10EC2, 0x10EC4}, {0x1123F, 0x11240}, {0x11380, 0x11389}, {0x1138B, 0x1138B},
    {0x1138E, 0x1138E}, {0x11390, 0x113B5}, {0x113B7, 0x113B7}, {0x113D1, 0x113D1}, {0x113D3, 0x113D3},
    {0x11BC0, 0x11BE0}, {0x11F02, 0x11F02}, {0x11F04, 0x11F10}, {0x11F12, 0x11F33}, {0x1342F, 0x1342F},
    {0x13441, 0x13446}, {0x13460, 0x143FA}, {0x16100, 0x1611D}, {0x16D40, 0x16D6C}, {0x18CFF, 0x18CFF},
    {0x1B132, 0x1B132}, {0x1B155, 0x1B155}, {0x1DF25, 0x1DF2A}, {0x1E030, 0x1E06D}, {0x1E4D0, 0x1E4EB},
    {0x1E5D0, 0x1E5ED}, {0x1E5F0, 0x1E5F0}, {0x2B739, 0x2B739}, {0x2EBF0, 0x2EE5D}, {0x31350, 0x323AF},
};
static const tok_range k_extra_number[] = {
    {0x10D40, 0x10D49}, {0x116D0, 0x116E3}, {0x11BF0, 0x11BF9}, {0x11F50, 0x11F59}, {0x16130, 0x16139},
    {0x16D70, 0x16D79}, {0x1CCF0, 0x1CCF9}, {0x1D2C0, 0x1D2D3}, {0x1E4F0, 0x1E4F9}, {0x1E5F1, 0x1E5FA},
};
static const tok_range k_extra_numeric[] = {
    {0x10D40, 0x10D49}, {0x116D0, 0x116E3}, {0x11BF0, 0x11BF9}, {0x11DE0, 0x11DE9}, {0x16130, 0x16139},
    {0x16D70, 0x16D79}, {0x16FF4, 0x16FF6}, {0x1CCF0, 0x1CCF9}, {0x1E5F1, 0x1E5FA},
};
static const tok_range k_extra_word[] = {
    {0x897, 0x897},     {0x1C89, 0x1C8A},   {0xA7CB, 0xA7CD},   {0xA7DA, 0xA7DC},   {0x105C0, 0x105F3},
    {0x10D40, 0x10D65}, {0x10D69, 0x10D6D}, {0x10D6F, 0x10D85}, {0x10EC2, 0x10EC4}, {0x10EFC, 0x10EFC},
    {0x11380, 0x11389}, {0x1138B, 0x1138B}, {0x1138E, 0x1138E}, {0x11390, 0x113B5}, {0x113B7, 0x113C0},
    {0x113C2, 0x113C2}, {0x113C5, 0x113C5}, {0x113C7, 0x113CA}, {0x113CC, 0x113D3}, {0x113E1, 0x113E2},
    {0x116D0, 0x116E3}, {0x11BC0, 0x11BE0}, {0x11BF0, 0x11BF9}, {0x11F5A, 0x11F5A}, {0x13460, 0x143FA},
    {0x16100, 0x16139}, {0x16D40, 0x16D6C}, {0x16D70, 0x16D79}, {0x18CFF, 0x18CFF}, {0x1CCF0, 0x1CCF9},
    {0x1E5D0, 0x1E5FA}, {0x2EBF0, 0x2EE5D},
};

#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

static const struct {
    const tok_range *r;
    size_t n;
} k_tables[] = {
    [TOK_UNI_LETTER] = {k_extra_letter, N_OF(k_extra_letter)},
    [TOK_UNI_NUMBER] = {k_extra_number, N_OF(k_extra_number)},
    [TOK_UNI_NUMERIC] = {k_extra_numeric, N_OF(k_extra_numeric)},
    [TOK_UNI_WORD] = {k_extra_word, N_OF(k_extra_word)},
};

const tok_range *tok_unicode_extra(tok_uni_class which, size_t *n) {
    *n = k_tables[which].n;
    return k_tables[which].r;
}

bool tok_unicode_extra_has(tok_uni_class which, uint32_t cp) {
    const tok_range *r = k_tables[which].r;
    size_t lo = 0, hi = k_tables[which].n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < r[mid].lo)
            hi = mid;
        else if (cp > r[mid].hi)
            lo = mid + 1;
        else
            return true;
    }
    return false;
}
