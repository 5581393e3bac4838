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

// Adds event e (time t) to the cell at word `cell` (`level::add`).
fn add(cell: u32, t: i64, e: u32) {
    cells[cell + ROWS] += 1.0lf;
    if (t > as_int(cells[cell + MAX_TS])) {
        cells[cell + MAX_TS] = as_word(t);
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
            if (cells[cell + k.count] == 0.0lf) {
                cells[m] = select(0.0lf, x, is_finite(x));
            }
            let d = x - cells[m];
            cells[m + 1u] += d;
            cells[m + 2u] += d * d;
        }
        cells[cell + k.count] += 1.0lf;
        if (k.sum != ABSENT) {
            cells[cell + k.sum] += x;
        }
        if (k.min != ABSENT && x < cells[cell + k.min]) {
            cells[cell + k.min] = x;
        }
        if (k.max != ABSENT && x > cells[cell + k.max]) {
            cells[cell + k.max] = x;
        }
        if (k.last != ABSENT && t >= as_int(cells[cell + k.last + 1u])) {
            cells[cell + k.last] = x;
            cells[cell + k.last + 1u] = as_word(t);
        }
    }
}

// Merges the cell at `src` into the cell at `dst` (`level::merge_into`).
fn merge_into(dst: u32, src: u32) {
    cells[dst + ROWS] += cells[src + ROWS];
    cells[dst + MAX_TS] = as_word(max(as_int(cells[dst + MAX_TS]), as_int(cells[src + MAX_TS])));
    for (var c = 0u; c < p.columns; c++) {
        let k = col(c);
        if (k.count == ABSENT || cells[src + k.count] == 0.0lf) {
            continue;
        }
        if (k.moments != ABSENT) {
            let m = moments_merge(cell_moments(k, dst), cell_moments(k, src));
            cells[dst + k.moments] = m.mean;
            cells[dst + k.moments + 1u] = 0.0lf;
            cells[dst + k.moments + 2u] = m.m2;
        }
        cells[dst + k.count] += cells[src + k.count];
        if (k.sum != ABSENT) {
            cells[dst + k.sum] += cells[src + k.sum];
        }
        if (k.min != ABSENT) {
            cells[dst + k.min] = min(cells[dst + k.min], cells[src + k.min]);
        }
        if (k.max != ABSENT) {
            cells[dst + k.max] = max(cells[dst + k.max], cells[src + k.max]);
        }
        if (k.last != ABSENT && as_int(cells[src + k.last + 1u]) >= as_int(cells[dst + k.last + 1u])) {
            cells[dst + k.last] = cells[src + k.last];
            cells[dst + k.last + 1u] = cells[src + k.last + 1u];
        }
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
    for (var j = i; j < end && sorted[j].x == slot; j++) {
        let e = sorted[j].y;
        let t = ts[e];
        let pane = div_euclid(t, p.hop);
        let pos = u32(rem_euclid(pane, i64(p.ring)));
        let cell = (pos * p.cap + slot) * p.stride;
        let tag = as_int(cells[cell + TAG]);
        var dst = cell;
        if (tag != pane) {
            if (tag == empty_pane() || tag < pane) {
                if (tag != empty_pane() && p.lifetime != 0u) {
                    merge_into(base, cell);
                }
                for (var w = 0u; w < p.stride; w++) {
                    cells[cell + w] = identity[w];
                }
                cells[cell + TAG] = as_word(pane);
            } else if (p.lifetime != 0u) {
                dst = base;
            } else {
                expired += 1u;
                continue;
            }
        }
        add(dst, t, e);
        if (dst == base) {
            into_base += 1u;
        } else {
            folded += 1u;
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
