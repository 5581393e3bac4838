// Sketch and list groups of the cells (`level::Sketch`): HyperLogLog sketches
// (`approx_distinct`), DDSketch bins (`quantile`), the newest values (`last_n`) and
// frequent-values summaries (`top_k`). Prepended, after common.wgsl and cells.wgsl, to
// the fold. Each function is the twin of one in `panes_kernels::{hll, quantile, lastn,
// topk}` and leaves the same bits in the group's words: an add is the same steps; a
// merge is a two-pointer merge where the host inserts one entry at a time, which gives
// the same words because each group is a function of the values added (a set, a
// multiset, or the newest values), whatever the grouping (see those modules).
//
// Groups live in `cells` only: a level with sketch groups is folded without blocks (the
// host sets `blocks` to 0), so the partials never hold one.
//
// Loops over words are unrolled by four: Mesa's lavapipe ends an invocation after
// 65 535 loop iterations, and the host sizes the fold's segments by these loops' counts.

// Moves `len` words of the cells from `src` to `to`; the ranges may overlap (memmove).
fn move_words(to: u32, src: u32, len: u32) {
    if (to == src || len == 0u) {
        return;
    }
    if (to < src) {
        var i = 0u;
        while (i + 4u <= len) {
            cells[to + i] = cells[src + i];
            cells[to + i + 1u] = cells[src + i + 1u];
            cells[to + i + 2u] = cells[src + i + 2u];
            cells[to + i + 3u] = cells[src + i + 3u];
            i += 4u;
        }
        while (i < len) {
            cells[to + i] = cells[src + i];
            i += 1u;
        }
    } else {
        var i = len;
        while (i >= 4u) {
            cells[to + i - 1u] = cells[src + i - 1u];
            cells[to + i - 2u] = cells[src + i - 2u];
            cells[to + i - 3u] = cells[src + i - 3u];
            cells[to + i - 4u] = cells[src + i - 4u];
            i -= 4u;
        }
        while (i > 0u) {
            cells[to + i - 1u] = cells[src + i - 1u];
            i -= 1u;
        }
    }
}

// Sets `len` words of the cells from `at` to 0.
fn zero_words(at: u32, len: u32) {
    var i = 0u;
    while (i + 4u <= len) {
        cells[at + i] = 0.0lf;
        cells[at + i + 1u] = 0.0lf;
        cells[at + i + 2u] = 0.0lf;
        cells[at + i + 3u] = 0.0lf;
        i += 4u;
    }
    while (i < len) {
        cells[at + i] = 0.0lf;
        i += 1u;
    }
}

// A count from a group's header, at most `cap` (a checkpoint is checked on load; this
// keeps a wrong header from reaching outside the group all the same).
fn header(at: u32, cap: u32) -> u32 {
    return min(u32(max(cells[at], 0.0lf)), cap);
}

// ---- approx_distinct: HyperLogLog (`hll`) ---------------------------------------------

// Bits of hash a value carries (`hll::HASH_BITS`).
const HASH_BITS: u32 = 52u;
// Header of a dense sketch.
const HLL_DENSE: f64 = -1.0lf;

fn hll_registers_words(p: u32) -> u32 {
    return (1u << p) / 8u;
}

fn hll_sparse_capacity(p: u32) -> u32 {
    return clamp(hll_registers_words(p), 64u, 1024u);
}

fn hll_words(p: u32) -> u32 {
    return 1u + max(hll_registers_words(p), hll_sparse_capacity(p));
}

// Whether `x` is a hash `hll::value` made: an integer in [0, 2^52).
fn hll_is_hash(x: f64) -> bool {
    return x >= 0.0lf && x < 4503599627370496.0lf && floor(x) == x;
}

fn leading_zeros64(x: u64) -> u32 {
    let hi = u32(x >> 32u);
    if (hi != 0u) {
        return countLeadingZeros(hi);
    }
    return 32u + countLeadingZeros(u32(x & 0xfffffffflu));
}

// Register index and rank of hash `h`, packed as register << 6 | rank.
fn hll_register_rank(h: u64, p: u32) -> u32 {
    let reg = u32(h >> (HASH_BITS - p));
    let rest = h << (64u - HASH_BITS + p);
    let rank = min(leading_zeros64(rest) + 1u, HASH_BITS + 1u - p);
    return (reg << 6u) | rank;
}

// Raises a register of the dense sketch at `g` (`hll::raise`).
fn hll_raise(g: u32, rr: u32) {
    let reg = rr >> 6u;
    let rank = u64(rr & 63u);
    let w = g + 1u + reg / 8u;
    let shift = (reg % 8u) * 8u;
    let bits = bitcast<u64>(cells[w]);
    if (((bits >> shift) & 0xfflu) < rank) {
        cells[w] = bitcast<f64>((bits & ~(0xfflu << shift)) | (rank << shift));
    }
}

// The sparse hashes of a sketch turning dense, as register << 6 | rank: module scope,
// so that it is not zeroed at every call.
var<private> hll_rr: array<u32, 1024>;

// Turns the sparse sketch at `g` dense (`hll::densify`).
fn hll_densify(g: u32, p: u32) {
    let k = header(g, 1024u);
    for (var i = 0u; i < k; i++) {
        hll_rr[i] = hll_register_rank(u64(cells[g + 1u + i]), p);
    }
    cells[g] = HLL_DENSE;
    zero_words(g + 1u, hll_words(p) - 1u);
    for (var i = 0u; i < k; i++) {
        hll_raise(g, hll_rr[i]);
    }
}

// Adds hash `h` to the sketch at `g` (`hll::insert`).
fn hll_insert(g: u32, h: u64, p: u32) {
    if (cells[g] == HLL_DENSE) {
        hll_raise(g, hll_register_rank(h, p));
        return;
    }
    let cap = hll_sparse_capacity(p);
    let k = header(g, cap);
    let x = f64(h);
    var lo = 0u;
    var hi = k;
    while (lo < hi) {
        let mid = (lo + hi) / 2u;
        let y = cells[g + 1u + mid];
        if (y < x) {
            lo = mid + 1u;
        } else if (y > x) {
            hi = mid;
        } else {
            return;
        }
    }
    if (k < cap) {
        move_words(g + 2u + lo, g + 1u + lo, k - lo);
        cells[g + 1u + lo] = x;
        cells[g] = f64(k + 1u);
    } else {
        hll_densify(g, p);
        hll_raise(g, hll_register_rank(h, p));
    }
}

fn hll_add(g: u32, x: f64, p: u32) {
    if (hll_is_hash(x)) {
        hll_insert(g, u64(x), p);
    }
}

// Bytewise maximum of two register words (`hll::max_bytes`).
fn max_bytes(a: u64, b: u64) -> u64 {
    let h = 0x8080808080808080lu;
    let a_ge = (((a | h) - b) & h) >> 7u;
    let mask = a_ge * 0xfflu;
    return (a & mask) | (b & ~mask);
}

// Merges the sketch at `src` into the one at `dst` (`hll::merge`): the sketch of the
// union. Two sparse sketches whose union fits stay sparse (merged from the back, in
// place); else `dst` turns dense and takes every hash or register of `src`.
fn hll_merge(dst: u32, src: u32, p: u32) {
    let cap = hll_sparse_capacity(p);
    if (cells[src] != HLL_DENSE) {
        let ks = header(src, cap);
        if (cells[dst] != HLL_DENSE) {
            let kd = header(dst, cap);
            var i = 0u;
            var j = 0u;
            var u = 0u;
            while (i < kd || j < ks) {
                if (j >= ks || (i < kd && cells[dst + 1u + i] < cells[src + 1u + j])) {
                    i += 1u;
                } else if (i >= kd || cells[src + 1u + j] < cells[dst + 1u + i]) {
                    j += 1u;
                } else {
                    i += 1u;
                    j += 1u;
                }
                u += 1u;
            }
            if (u <= cap) {
                i = kd;
                j = ks;
                var w = u;
                while (j > 0u) {
                    let b = cells[src + j];
                    if (i > 0u && cells[dst + i] > b) {
                        cells[dst + w] = cells[dst + i];
                        i -= 1u;
                    } else {
                        if (i > 0u && cells[dst + i] == b) {
                            i -= 1u;
                        }
                        cells[dst + w] = b;
                        j -= 1u;
                    }
                    w -= 1u;
                }
                cells[dst] = f64(u);
                return;
            }
            hll_densify(dst, p);
        }
        for (var j = 0u; j < ks; j++) {
            hll_raise(dst, hll_register_rank(u64(cells[src + 1u + j]), p));
        }
        return;
    }
    if (cells[dst] != HLL_DENSE) {
        hll_densify(dst, p);
    }
    let n = hll_registers_words(p);
    var i = 0u;
    while (i + 4u <= n) {
        let w = dst + 1u + i;
        let s = src + 1u + i;
        cells[w] = bitcast<f64>(max_bytes(bitcast<u64>(cells[w]), bitcast<u64>(cells[s])));
        cells[w + 1u] = bitcast<f64>(max_bytes(bitcast<u64>(cells[w + 1u]), bitcast<u64>(cells[s + 1u])));
        cells[w + 2u] = bitcast<f64>(max_bytes(bitcast<u64>(cells[w + 2u]), bitcast<u64>(cells[s + 2u])));
        cells[w + 3u] = bitcast<f64>(max_bytes(bitcast<u64>(cells[w + 3u]), bitcast<u64>(cells[s + 3u])));
        i += 4u;
    }
    while (i < n) {
        let w = dst + 1u + i;
        cells[w] = bitcast<f64>(max_bytes(bitcast<u64>(cells[w]), bitcast<u64>(cells[src + 1u + i])));
        i += 1u;
    }
}

// ---- quantile: DDSketch bins (`quantile`) ---------------------------------------------
// A bin is the bits (key + 2^23) << 40 | count, bins ascending by key. The key of an
// event's value is computed on the host (WGSL has no f64 logarithm) and arrives as a
// column of its own.

fn q_pack(key: i64, count: u64) -> f64 {
    return bitcast<f64>((u64(key + 8388608li) << 40u) | count);
}

fn q_key(w: f64) -> i64 {
    return i64(bitcast<u64>(w) >> 40u) - 8388608li;
}

fn q_count(w: f64) -> u64 {
    return bitcast<u64>(w) & 0xfffffffffflu;
}

// Adds `count` values of key `k` to the sketch at `s` (`quantile::insert`).
fn q_insert(s: u32, k: i64, count: u64, cap: u32) {
    let n = header(s, cap);
    var lo = 0u;
    var hi = n;
    while (lo < hi) {
        let mid = (lo + hi) / 2u;
        let km = q_key(cells[s + 1u + mid]);
        if (km < k) {
            lo = mid + 1u;
        } else if (km > k) {
            hi = mid;
        } else {
            cells[s + 1u + mid] = q_pack(k, q_count(cells[s + 1u + mid]) + count);
            return;
        }
    }
    let at = lo;
    if (n < cap) {
        move_words(s + 2u + at, s + 1u + at, n - at);
        cells[s + 1u + at] = q_pack(k, count);
        cells[s] = f64(n + 1u);
    } else if (at == 0u) {
        cells[s + 1u] = q_pack(q_key(cells[s + 1u]), q_count(cells[s + 1u]) + count);
    } else if (at == 1u) {
        cells[s + 1u] = q_pack(k, q_count(cells[s + 1u]) + count);
    } else {
        let c0 = q_count(cells[s + 1u]);
        cells[s + 2u] = q_pack(q_key(cells[s + 2u]), c0 + q_count(cells[s + 2u]));
        move_words(s + 1u, s + 2u, at - 1u);
        cells[s + at] = q_pack(k, count);
    }
}

// The key of the sketch at `s`'s bin i − 1 (`q_merge` counts bins from 1).
fn q_bin_key(s: u32, i: u32) -> i64 {
    return q_key(cells[s + i]);
}

// Merges the sketch at `src` into the one at `dst` (`quantile::merge`). The result is
// the sketch of the union of the bins: every distinct key with the sum of its counts
// while they fit; else the capacity − 1 highest keys, and one bin at the capacity-th
// highest key with the counts of it and of every lower key.
fn q_merge(dst: u32, src: u32, cap: u32) {
    let nd = header(dst, cap);
    let ns = header(src, cap);
    if (ns == 0u) {
        return;
    }
    // Distinct keys of the union, counted from the top; `low` is the capacity-th.
    var i = nd;
    var j = ns;
    var u = 0u;
    var low = 0li;
    while (i > 0u || j > 0u) {
        var k: i64;
        if (j == 0u || (i > 0u && q_bin_key(dst, i) > q_bin_key(src, j))) {
            k = q_bin_key(dst, i);
            i -= 1u;
        } else if (i == 0u || q_bin_key(src, j) > q_bin_key(dst, i)) {
            k = q_bin_key(src, j);
            j -= 1u;
        } else {
            k = q_bin_key(dst, i);
            i -= 1u;
            j -= 1u;
        }
        u += 1u;
        if (u == cap) {
            low = k;
        }
    }
    // Bins kept whole: those above `low` when collapsing, else all.
    let collapse = u > cap;
    var rest = 0lu;
    var d_keep = nd;
    var s_keep = ns;
    if (collapse) {
        d_keep = 0u;
        for (var x = 0u; x < nd; x++) {
            let w = cells[dst + 1u + x];
            if (q_key(w) <= low) {
                rest += q_count(w);
            } else {
                d_keep += 1u;
            }
        }
        s_keep = 0u;
        for (var x = 0u; x < ns; x++) {
            let w = cells[src + 1u + x];
            if (q_key(w) <= low) {
                rest += q_count(w);
            } else {
                s_keep += 1u;
            }
        }
        // The kept bins of `dst` go to the bottom, after the collapsed bin's place.
        move_words(dst + 2u, dst + 1u + nd - d_keep, d_keep);
    }
    // Merge from the top, in place: `dst`'s kept bins (below slot `first + d_keep`)
    // with `src`'s top `s_keep`, into the slots from `first` up.
    let first = select(0u, 1u, collapse);
    let total = select(u, cap, collapse);
    i = d_keep;
    j = ns;
    var w = total;
    while (j > ns - s_keep) {
        let b = cells[src + j];
        let kb = q_key(b);
        if (i > 0u && q_key(cells[dst + first + i]) > kb) {
            cells[dst + w] = cells[dst + first + i];
            i -= 1u;
        } else if (i > 0u && q_key(cells[dst + first + i]) == kb) {
            cells[dst + w] = q_pack(kb, q_count(cells[dst + first + i]) + q_count(b));
            i -= 1u;
            j -= 1u;
        } else {
            cells[dst + w] = b;
            j -= 1u;
        }
        w -= 1u;
    }
    if (collapse) {
        cells[dst + 1u] = q_pack(low, rest);
    }
    cells[dst] = f64(total);
}

// ---- last_n: the newest values (`lastn`) ----------------------------------------------
// Entries (ts, value), ascending by (ts, arrival).

fn ln_ts(g: u32, i: u32) -> i64 {
    return as_int(cells[g + 1u + 2u * i]);
}

// Adds value `x` at time `t`, arriving after every value of the group at `g`
// (`lastn::add`).
fn ln_add(g: u32, t: i64, x: f64, n: u32) {
    let k = header(g, n);
    var at = k;
    while (at > 0u && ln_ts(g, at - 1u) > t) {
        at -= 1u;
    }
    if (k < n) {
        move_words(g + 3u + 2u * at, g + 1u + 2u * at, 2u * (k - at));
        cells[g + 1u + 2u * at] = as_word(t);
        cells[g + 2u + 2u * at] = x;
        cells[g] = f64(k + 1u);
    } else if (at > 0u) {
        move_words(g + 1u, g + 3u, 2u * (at - 1u));
        cells[g + 2u * at - 1u] = as_word(t);
        cells[g + 2u * at] = x;
    }
}

// Merges the group at `src` (values that arrived later, or of other panes) into the one
// at `dst` (`lastn::merge`): the newest n of both, `src`'s after `dst`'s at equal times.
fn ln_merge(dst: u32, src: u32, n: u32) {
    let kd = header(dst, n);
    let ks = header(src, n);
    if (ks == 0u) {
        return;
    }
    let total = min(n, kd + ks);
    // Which entries survive: the newest `total`, counted from the top.
    var i = kd;
    var j = ks;
    for (var t = 0u; t < total; t++) {
        if (j > 0u && (i == 0u || ln_ts(src, j - 1u) >= ln_ts(dst, i - 1u))) {
            j -= 1u;
        } else {
            i -= 1u;
        }
    }
    let d_keep = kd - i;
    let s_from = j;
    move_words(dst + 1u, dst + 1u + 2u * i, 2u * d_keep);
    i = d_keep;
    j = ks;
    var w = total;
    while (j > s_from) {
        if (i > 0u && ln_ts(dst, i - 1u) > ln_ts(src, j - 1u)) {
            cells[dst + 2u * w - 1u] = cells[dst + 2u * i - 1u];
            cells[dst + 2u * w] = cells[dst + 2u * i];
            i -= 1u;
        } else {
            cells[dst + 2u * w - 1u] = cells[src + 2u * j - 1u];
            cells[dst + 2u * w] = cells[src + 2u * j];
            j -= 1u;
        }
        w -= 1u;
    }
    cells[dst] = f64(total);
}

// ---- top_k: frequent values (`topk`) ----------------------------------------------------
// Counters (value, count), ascending by value.

fn tk_value(g: u32, i: u32) -> f64 {
    return cells[g + 1u + 2u * i];
}

// Adds value `x` (not NaN) to the summary at `g` (`topk::add`).
fn tk_add(g: u32, x_in: f64, cap: u32) {
    // −0.0 is 0.0 (a select: a compiler may fold `x + 0.0` to `x`).
    let x = select(x_in, 0.0lf, x_in == 0.0lf);
    let m = header(g, cap);
    var lo = 0u;
    var hi = m;
    while (lo < hi) {
        let mid = (lo + hi) / 2u;
        let v = tk_value(g, mid);
        if (v < x) {
            lo = mid + 1u;
        } else if (v > x) {
            hi = mid;
        } else {
            cells[g + 2u + 2u * mid] += 1.0lf;
            return;
        }
    }
    if (m < cap) {
        move_words(g + 3u + 2u * lo, g + 1u + 2u * lo, 2u * (m - lo));
        cells[g + 1u + 2u * lo] = x;
        cells[g + 2u + 2u * lo] = 1.0lf;
        cells[g] = f64(m + 1u);
        return;
    }
    // Full: the new value's count, 1, is the (c + 1)-th largest; every counter loses 1.
    var w = 0u;
    for (var i = 0u; i < m; i++) {
        let c = cells[g + 2u + 2u * i] - 1.0lf;
        if (c > 0.0lf) {
            cells[g + 1u + 2u * w] = tk_value(g, i);
            cells[g + 2u + 2u * w] = c;
            w += 1u;
        }
    }
    zero_words(g + 1u + 2u * w, 2u * (cap - w));
    cells[g] = f64(w);
}

// The union of the summaries at `a` (ma counters) and `b` (mb), counts summed: its
// counters, how many of them have a count of at least `v`, and its largest count.
struct TkUnion {
    counters: u32,
    at_least: u32,
    top: f64,
}

fn tk_union(a: u32, ma: u32, b: u32, mb: u32, v: f64) -> TkUnion {
    var i = 0u;
    var j = 0u;
    var r = TkUnion(0u, 0u, 0.0lf);
    while (i < ma || j < mb) {
        var c: f64;
        if (j >= mb || (i < ma && tk_value(a, i) < tk_value(b, j))) {
            c = cells[a + 2u + 2u * i];
            i += 1u;
        } else if (i >= ma || tk_value(b, j) < tk_value(a, i)) {
            c = cells[b + 2u + 2u * j];
            j += 1u;
        } else {
            c = cells[a + 2u + 2u * i] + cells[b + 2u + 2u * j];
            i += 1u;
            j += 1u;
        }
        r.counters += 1u;
        r.at_least += u32(c >= v);
        r.top = max(r.top, c);
    }
    return r;
}

// Merges the summary at `src` into the one at `dst` (`topk::merge`): counters summed by
// value; past capacity, the (c + 1)-th largest count is subtracted from every counter
// and those left at zero or below go. In place: `dst`'s counters are updated and
// compacted first, then `src`'s new values are merged in from the top.
fn tk_merge(dst: u32, src: u32, cap: u32) {
    let md = header(dst, cap);
    let ms = header(src, cap);
    if (ms == 0u) {
        return;
    }
    let all = tk_union(dst, md, src, ms, 0.0lf);
    let u = all.counters;
    var cut = 0.0lf;
    if (u > cap) {
        // The (c + 1)-th largest count (counts are whole numbers): the largest v that
        // at least c + 1 counters reach, by bisection.
        var lo = 1.0lf;
        var hi = all.top;
        while (lo < hi) {
            let mid = lo + floor((hi - lo + 1.0lf) * 0.5lf);
            if (tk_union(dst, md, src, ms, mid).at_least >= cap + 1u) {
                lo = mid;
            } else {
                hi = mid - 1.0lf;
            }
        }
        cut = lo;
    }
    // `dst`'s counters, with `src`'s counts of the same values added, less the cut.
    var i = 0u;
    var j = 0u;
    var kept = 0u;
    for (i = 0u; i < md; i++) {
        let v = tk_value(dst, i);
        while (j < ms && tk_value(src, j) < v) {
            j += 1u;
        }
        var c = cells[dst + 2u + 2u * i];
        if (j < ms && tk_value(src, j) == v) {
            c += cells[src + 2u + 2u * j];
        }
        // Less 0 within capacity: the same bits.
        c -= cut;
        if (c > 0.0lf) {
            cells[dst + 1u + 2u * kept] = v;
            cells[dst + 2u + 2u * kept] = c;
            kept += 1u;
        }
    }
    // `src`'s values not in `dst` that keep a count: a value dropped from `dst` had a
    // larger count there, so it drops here too.
    var fresh = 0u;
    i = 0u;
    for (j = 0u; j < ms; j++) {
        let v = tk_value(src, j);
        while (i < kept && tk_value(dst, i) < v) {
            i += 1u;
        }
        if ((i >= kept || tk_value(dst, i) != v) && cells[src + 2u + 2u * j] - cut > 0.0lf) {
            fresh += 1u;
        }
    }
    let total = kept + fresh;
    i = kept;
    j = ms;
    var w = total;
    while (w > i) {
        let v = tk_value(src, j - 1u);
        let c = cells[src + 2u * j] - cut;
        if (i > 0u && tk_value(dst, i - 1u) > v) {
            cells[dst + 2u * w - 1u] = tk_value(dst, i - 1u);
            cells[dst + 2u * w] = cells[dst + 2u * i];
            i -= 1u;
            w -= 1u;
        } else if ((i > 0u && tk_value(dst, i - 1u) == v) || !(c > 0.0lf)) {
            j -= 1u;
        } else {
            cells[dst + 2u * w - 1u] = v;
            cells[dst + 2u * w] = c;
            j -= 1u;
            w -= 1u;
        }
    }
    zero_words(dst + 1u + 2u * total, 2u * (cap - total));
    cells[dst] = f64(total);
}

// ---- a column's groups ------------------------------------------------------------------

// Adds event `e` (time t, value x, not NaN) to the groups of column `k` of the cell at
// word `cell`.
fn sketches_add(k: Col, cell: u32, t: i64, e: u32, x: f64) {
    if (k.hll != ABSENT) {
        hll_add(cell + k.hll, x, k.hll_precision);
    }
    if (k.quantile != ABSENT) {
        q_insert(cell + k.quantile, i64(values[k.quantile_keys * p.n + e]), 1lu, k.quantile_capacity);
    }
    if (k.last_n != ABSENT) {
        ln_add(cell + k.last_n, t, x, k.last_n_n);
    }
    if (k.top_k != ABSENT) {
        tk_add(cell + k.top_k, x, k.top_k_capacity);
    }
}

// Merges the groups of column `k` of the cell at `src` into those of the cell at `dst`.
fn sketches_merge(k: Col, dst: u32, src: u32) {
    if (k.hll != ABSENT) {
        hll_merge(dst + k.hll, src + k.hll, k.hll_precision);
    }
    if (k.quantile != ABSENT) {
        q_merge(dst + k.quantile, src + k.quantile, k.quantile_capacity);
    }
    if (k.last_n != ABSENT) {
        ln_merge(dst + k.last_n, src + k.last_n, k.last_n_n);
    }
    if (k.top_k != ABSENT) {
        tk_merge(dst + k.top_k, src + k.top_k, k.top_k_capacity);
    }
}
