// Fold: a micro-batch of events, sorted by (key id, arrival index), into the cells of
// one hop level. A key's events form one run of the sorted array; a thread walks a
// segment of a run in arrival order and applies the same per-event step as the scalar
// backend (`LevelState::fold_event`), so results are deterministic and every key's
// events are folded in the order they arrived. Threads of one round touch disjoint
// cells: no atomics on cells.
//
// Segments: a run is cut at every multiple of `seg` in the sorted array, so no thread
// walks more than `seg` events (a GPU may stop or time out long-running invocations;
// Mesa's lavapipe ends any invocation after 65 535 loop iterations). Segment r of
// every run is folded in round r, one dispatch per round, in order: round 0 starts at
// the runs' heads, later rounds at the multiples of `seg`. `fold_plan` finds how many
// rounds a batch needs.
//
// Blocks: so that a key with many events in one batch is not folded one event at a
// time, `fold_blocks` first reduces, in parallel, every aligned block of BLOCK sorted
// events that share one key and one pane into a partial cell; the walk then merges
// such a block's partial in one step instead of its BLOCK events. All events of a
// block meet the same pane-recycling decision (they share the pane, and only this
// key's events change its cells), so the result is the per-event one up to summation
// order (the variance moments merge as in `level::merge_into`).

struct FoldParams {
    hop: i64,
    // Events in the batch (the sorted array may be longer: padding sorts last).
    n: u32,
    // Key capacity: ring cell (slot, pos) is cell pos * cap + slot; the base cell of
    // a slot is cell ring * cap + slot.
    cap: u32,
    ring: u32,
    stride: u32,
    columns: u32,
    lifetime: u32,
    // Round of this dispatch.
    round: u32,
    // Most events one thread folds.
    seg: u32,
    // Whether the walk may take blocks' partials (0 for a level with sketch groups,
    // whose blocks are not reduced: see sketches.wgsl).
    blocks: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: FoldParams;
// (key id, arrival index), sorted.
@group(0) @binding(1) var<storage, read> sorted: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read> ts: array<i64>;
// Column-major: value of column c for event e at c * n + e; NaN = null.
@group(0) @binding(3) var<storage, read> values: array<f64>;
// COL_FIELDS word offsets per column (ABSENT for a field not stored).
// The identity cell: what a recycled cell is reset to.
@group(0) @binding(4) var<storage, read> cols: array<u32>;
@group(0) @binding(5) var<storage, read> identity: array<f64>;
@group(0) @binding(6) var<storage, read_write> cells: array<f64>;
// Event × level pairs folded into a ring cell, into the base cell, and expired; then
// the last round any run needs.
@group(0) @binding(7) var<storage, read_write> stats: array<atomic<u32>, 4>;
// One partial cell per aligned block of sorted events; its tag is the block's pane, or
// the empty tag when the block's events do not all share one key and one pane.
@group(0) @binding(8) var<storage, read_write> partials: array<f64>;

// Events per block (the host keeps `seg` a multiple of it).
const BLOCK: u32 = 64u;

// Whether this pipeline folds sketch groups (sketches.wgsl): the host builds one
// pipeline with and one without, for levels with and without them. Without, the
// sketch code is dead and compiled away; on a SIMD software adapter (lavapipe), which
// runs both sides of a branch under masks and counts every loop it enters against an
// invocation's budget, it would otherwise cost every event of every level.
override SKETCHES: bool = false;

// A word of the level's cells, or of the partials (q = true).
fn ld(q: bool, i: u32) -> f64 {
    if (q) {
        return partials[i];
    }
    return cells[i];
}

fn st(q: bool, i: u32, v: f64) {
    if (q) {
        partials[i] = v;
    } else {
        cells[i] = v;
    }
}

// `cell_moments` of a cell of the cells (q = false) or of the partials.
fn moments_of(q: bool, k: Col, cell: u32) -> Moments {
    let n = ld(q, cell + k.count);
    if (n == 0.0lf) {
        return Moments(0.0lf, 0.0lf, 0.0lf);
    }
    let m1 = ld(q, cell + k.moments + 1u);
    return Moments(n, ld(q, cell + k.moments) + m1 / n, centred_m2(ld(q, cell + k.moments + 2u), m1, n));
}

// The decay group at word `d` of the cells, or of the partials (q = true).
fn decay_of(q: bool, d: u32) -> Decay {
    return Decay(as_int(ld(q, d)), ld(q, d + 1u), ld(q, d + 2u));
}

fn store_decay(q: bool, d: u32, g: Decay) {
    st(q, d, as_word(g.r));
    st(q, d + 1u, g.w);
    st(q, d + 2u, g.xw);
}

// Adds event e (time t) to the cell at word `cell` of the cells, or of the partials
// (q = true) (`level::add`).
fn add(q: bool, cell: u32, t: i64, e: u32) {
    st(q, cell + ROWS, ld(q, cell + ROWS) + 1.0lf);
    if (t > as_int(ld(q, cell + MAX_TS))) {
        st(q, cell + MAX_TS, as_word(t));
    }
    for (var c = 0u; c < p.columns; c++) {
        let k = col(c);
        if (k.count == ABSENT) {
            continue;
        }
        let x = values[c * p.n + e];
        if (is_nan(x)) {
            continue;
        }
        if (k.moments != ABSENT) {
            let m = cell + k.moments;
            if (ld(q, cell + k.count) == 0.0lf) {
                st(q, m, select(0.0lf, x, is_finite(x)));
            }
            let d = x - ld(q, m);
            st(q, m + 1u, ld(q, m + 1u) + d);
            st(q, m + 2u, ld(q, m + 2u) + d * d);
        }
        st(q, cell + k.count, ld(q, cell + k.count) + 1.0lf);
        if (k.sum != ABSENT) {
            st(q, cell + k.sum, ld(q, cell + k.sum) + x);
        }
        if (k.min != ABSENT && below(x, ld(q, cell + k.min))) {
            st(q, cell + k.min, x);
        }
        if (k.max != ABSENT && above(x, ld(q, cell + k.max))) {
            st(q, cell + k.max, x);
        }
        if (k.last != ABSENT && t >= as_int(ld(q, cell + k.last + 1u))) {
            st(q, cell + k.last, x);
            st(q, cell + k.last + 1u, as_word(t));
        }
        if (k.first != ABSENT && t < as_int(ld(q, cell + k.first + 1u))) {
            st(q, cell + k.first, x);
            st(q, cell + k.first + 1u, as_word(t));
        }
        if (k.decay != ABSENT) {
            let d = cell + k.decay;
            store_decay(q, d, decay_merge(decay_of(q, d), Decay(t, 1.0lf, x), k.half_life));
        }
        // Blocks are never reduced for a level with sketch groups (`p.blocks`).
        if (SKETCHES && !q) {
            sketches_add(k, cell, t, e, x);
        }
    }
}

// Merges the cell at `src` (of the cells, or of the partials when q) into the cell
// at `dst` of the cells (`level::merge_into`).
fn merge_into(dst: u32, q: bool, src: u32) {
    cells[dst + ROWS] += ld(q, src + ROWS);
    cells[dst + MAX_TS] = as_word(max(as_int(cells[dst + MAX_TS]), as_int(ld(q, src + MAX_TS))));
    for (var c = 0u; c < p.columns; c++) {
        let k = col(c);
        if (k.count == ABSENT || ld(q, src + k.count) == 0.0lf) {
            continue;
        }
        if (k.moments != ABSENT) {
            let m = moments_merge(cell_moments(k, dst), moments_of(q, k, src));
            cells[dst + k.moments] = m.mean;
            cells[dst + k.moments + 1u] = 0.0lf;
            cells[dst + k.moments + 2u] = m.m2;
        }
        cells[dst + k.count] += ld(q, src + k.count);
        if (k.sum != ABSENT) {
            cells[dst + k.sum] += ld(q, src + k.sum);
        }
        if (k.min != ABSENT && below(ld(q, src + k.min), cells[dst + k.min])) {
            cells[dst + k.min] = ld(q, src + k.min);
        }
        if (k.max != ABSENT && above(ld(q, src + k.max), cells[dst + k.max])) {
            cells[dst + k.max] = ld(q, src + k.max);
        }
        if (k.last != ABSENT && as_int(ld(q, src + k.last + 1u)) >= as_int(cells[dst + k.last + 1u])) {
            cells[dst + k.last] = ld(q, src + k.last);
            cells[dst + k.last + 1u] = ld(q, src + k.last + 1u);
        }
        if (k.first != ABSENT && as_int(ld(q, src + k.first + 1u)) < as_int(cells[dst + k.first + 1u])) {
            cells[dst + k.first] = ld(q, src + k.first);
            cells[dst + k.first + 1u] = ld(q, src + k.first + 1u);
        }
        if (k.decay != ABSENT) {
            let merged = decay_merge(decay_of(false, dst + k.decay), decay_of(q, src + k.decay), k.half_life);
            store_decay(false, dst + k.decay, merged);
        }
        if (SKETCHES && !q) {
            sketches_merge(k, dst, src);
        }
    }
}

// Reduces aligned block b of the sorted batch into partial cell b, if all its events
// share one key and one pane; else marks the partial empty.
@compute @workgroup_size(256)
fn fold_blocks(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let b = thread_index(wg, nwg, lid, 256u);
    let i0 = b * BLOCK;
    if (i0 + BLOCK > p.n) {
        return;
    }
    let pc = b * p.stride;
    let slot = sorted[i0].x;
    let pane = div_euclid(ts[sorted[i0].y], p.hop);
    for (var j = i0 + 1u; j < i0 + BLOCK; j++) {
        if (sorted[j].x != slot || div_euclid(ts[sorted[j].y], p.hop) != pane) {
            partials[pc + TAG] = as_word(empty_pane());
            return;
        }
    }
    for (var w = 0u; w < p.stride; w++) {
        partials[pc + w] = identity[w];
    }
    partials[pc + TAG] = as_word(pane);
    for (var j = i0; j < i0 + BLOCK; j++) {
        let e = sorted[j].y;
        add(true, pc, ts[e], e);
    }
}

// Resets the cell at word `cell` to the identity cell (unrolled by four: a cell with
// sketch groups has thousands of words, and lavapipe counts loop iterations).
fn reset(cell: u32) {
    var w = 0u;
    while (w + 4u <= p.stride) {
        cells[cell + w] = identity[w];
        cells[cell + w + 1u] = identity[w + 1u];
        cells[cell + w + 2u] = identity[w + 2u];
        cells[cell + w + 3u] = identity[w + 3u];
        w += 4u;
    }
    while (w < p.stride) {
        cells[cell + w] = identity[w];
        w += 1u;
    }
}

fn is_head(i: u32) -> bool {
    return i == 0u || sorted[i - 1u].x != sorted[i].x;
}

// Round of the segment starting at the multiple of `seg` at i (not a run head): the
// number of multiples of `seg` in (run start, i], found by a binary search for the
// run's start.
fn round_of(i: u32) -> u32 {
    let slot = sorted[i].x;
    var lo = 0u;
    var hi = i;
    while (lo < hi) {
        let mid = lo + (hi - lo) / 2u;
        if (sorted[mid].x < slot) {
            lo = mid + 1u;
        } else {
            hi = mid;
        }
    }
    return i / p.seg - lo / p.seg;
}

// Start of thread t's segment in this round, or n when it has none.
fn segment_start(t: u32) -> u32 {
    if (p.round == 0u) {
        if (t < p.n && is_head(t)) {
            return t;
        }
        return p.n;
    }
    let i = (t + 1u) * p.seg;
    if (i < p.n && !is_head(i) && round_of(i) == p.round) {
        return i;
    }
    return p.n;
}

// Records the last round the batch needs (one thread per multiple of `seg`).
@compute @workgroup_size(256)
fn fold_plan(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (thread_index(wg, nwg, lid, 256u) + 1u) * p.seg;
    if (i < p.n && !is_head(i)) {
        atomicMax(&stats[3], round_of(i));
    }
}

@compute @workgroup_size(256)
fn fold(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = segment_start(thread_index(wg, nwg, lid, 256u));
    if (i >= p.n) {
        return;
    }
    let slot = sorted[i].x;
    let end = min(i + p.seg - i % p.seg, p.n);
    var folded = 0u;
    var into_base = 0u;
    var expired = 0u;
    let base = (p.ring * p.cap + slot) * p.stride;
    var j = i;
    while (j < end && sorted[j].x == slot) {
        // A whole block of this key and one pane: its partial, in one step.
        let block = p.blocks != 0u && j % BLOCK == 0u && j + BLOCK <= end
            && as_int(partials[(j / BLOCK) * p.stride + TAG]) != empty_pane();
        let events = select(1u, BLOCK, block);
        let e = sorted[j].y;
        let t = ts[e];
        let pane = div_euclid(t, p.hop);
        let pos = u32(rem_euclid(pane, i64(p.ring)));
        let cell = (pos * p.cap + slot) * p.stride;
        let tag = as_int(cells[cell + TAG]);
        var dst = cell;
        j += events;
        if (tag != pane) {
            if (tag == empty_pane() || tag < pane) {
                if (tag != empty_pane() && p.lifetime != 0u) {
                    merge_into(base, false, cell);
                }
                reset(cell);
                cells[cell + TAG] = as_word(pane);
            } else if (p.lifetime != 0u) {
                dst = base;
            } else {
                expired += events;
                continue;
            }
        }
        if (block) {
            merge_into(dst, true, (j / BLOCK - 1u) * p.stride);
        } else {
            add(false, dst, t, e);
        }
        if (dst == base) {
            into_base += events;
        } else {
            folded += events;
        }
    }
    if (folded != 0u) {
        atomicAdd(&stats[0], folded);
    }
    if (into_base != 0u) {
        atomicAdd(&stats[1], into_base);
    }
    if (expired != 0u) {
        atomicAdd(&stats[2], expired);
    }
}
