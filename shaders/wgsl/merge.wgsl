// Merge: the features of one hop level for a set of keys as of time `at`. One thread
// per (key, feature): it scans the key's ring once, adding the cells whose pane lies
// in the feature's window (as the `Cpu` backend's `scan_window`), and writes the
// finished value, its validity and the key's read status.

struct MergeParams {
    hop: i64,
    at: i64,
    keys: u32,
    // Features of this level in this dispatch.
    features: u32,
    // Features of the whole read: the row length of the output.
    row: u32,
    cap: u32,
    ring: u32,
    stride: u32,
    lifetime: u32,
}

// One feature: aggregation code (Agg::ALL order), value column (ABSENT = count of
// rows), window in panes (0 = lifetime), output column.
struct Feature {
    agg: u32,
    column: u32,
    panes: u32,
    out: u32,
}

const COUNT: u32 = 0u;
const SUM: u32 = 1u;
const MEAN: u32 = 2u;
const MIN: u32 = 3u;
const MAX: u32 = 4u;
const VAR: u32 = 5u;
const STD: u32 = 6u;
const LAST: u32 = 7u;
const FIRST: u32 = 8u;
const DECAYED_SUM: u32 = 9u;
const DECAYED_COUNT: u32 = 10u;
// Read from sketch and list groups, merged on the host (the `Gpu` backend copies the
// keys' cells back); their codes, for the record.
const APPROX_DISTINCT: u32 = 11u;
const QUANTILE: u32 = 12u;
const LAST_N: u32 = 13u;
const TOP_K: u32 = 14u;

// Read statuses, by severity (ReadStatus).
const PANE_HOLDS_LATER_EVENTS: u32 = 1u;
const NOT_RETAINED: u32 = 2u;

@group(0) @binding(0) var<uniform> p: MergeParams;
// Key slot of each key to read; ABSENT (or ≥ cap) = unknown key.
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> features: array<Feature>;
@group(0) @binding(3) var<storage, read> cols: array<u32>;
@group(0) @binding(4) var<storage, read> cells: array<f64>;
// keys × row, row-major.
@group(0) @binding(5) var<storage, read_write> out_values: array<f64>;
@group(0) @binding(6) var<storage, read_write> out_valid: array<u32>;
// Per key, the worst status over its features (atomicMax across threads and levels).
@group(0) @binding(7) var<storage, read_write> out_status: array<atomic<u32>>;

// Partial aggregate of one column (or of rows) over a set of cells (`level::Acc`).
struct Acc {
    rows: f64,
    count: f64,
    sum: f64,
    moments: Moments,
    lo: f64,
    hi: f64,
    last: f64,
    last_ts: i64,
    first: f64,
    first_ts: i64,
    decay: Decay,
}

fn add_cell(acc: ptr<function, Acc>, cell: u32, column: u32) {
    (*acc).rows += cells[cell + ROWS];
    if (column == ABSENT) {
        return;
    }
    let k = col(column);
    let n = cells[cell + k.count];
    if (n == 0.0lf) {
        return;
    }
    (*acc).count += n;
    if (k.sum != ABSENT) {
        (*acc).sum += cells[cell + k.sum];
    }
    if (k.moments != ABSENT) {
        (*acc).moments = moments_merge((*acc).moments, cell_moments(k, cell));
    }
    if (k.min != ABSENT && below(cells[cell + k.min], (*acc).lo)) {
        (*acc).lo = cells[cell + k.min];
    }
    if (k.max != ABSENT && above(cells[cell + k.max], (*acc).hi)) {
        (*acc).hi = cells[cell + k.max];
    }
    if (k.last != ABSENT && as_int(cells[cell + k.last + 1u]) >= (*acc).last_ts) {
        (*acc).last_ts = as_int(cells[cell + k.last + 1u]);
        (*acc).last = cells[cell + k.last];
    }
    if (k.first != ABSENT && as_int(cells[cell + k.first + 1u]) < (*acc).first_ts) {
        (*acc).first_ts = as_int(cells[cell + k.first + 1u]);
        (*acc).first = cells[cell + k.first];
    }
    if (k.decay != ABSENT) {
        let d = cell + k.decay;
        let g = Decay(as_int(cells[d]), cells[d + 1u], cells[d + 2u]);
        (*acc).decay = decay_merge((*acc).decay, g, k.half_life);
    }
}

// Writes one output value; an invalid one is NaN, as on every backend.
fn write(i: u32, value: f64, valid: bool) {
    out_values[i] = select(bitcast<f64>(0x7ff8000000000000lu), value, valid);
    out_valid[i] = u32(valid);
}

@compute @workgroup_size(64)
fn merge(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = thread_index(wg, nwg, lid, 64u);
    if (t >= p.keys * p.features) {
        return;
    }
    let key = t / p.features;
    let f = features[t % p.features];
    let out = key * p.row + f.out;
    let slot = ids[key];
    let zero_when_empty = f.agg == COUNT || f.agg == SUM || f.agg == DECAYED_SUM || f.agg == DECAYED_COUNT;
    let nan = bitcast<f64>(0x7ff8000000000000lu);
    if (slot >= p.cap) {
        write(out, select(nan, 0.0lf, zero_when_empty), zero_when_empty);
        return;
    }
    let inf = bitcast<f64>(0x7ff0000000000000lu);
    var acc = Acc(0.0lf, 0.0lf, 0.0lf, Moments(0.0lf, 0.0lf, 0.0lf), inf, -inf, nan, empty_pane(),
        nan, no_first(), Decay(empty_pane(), 0.0lf, 0.0lf));
    var status = 0u;
    let p_t = div_euclid(p.at, p.hop);
    var lo = empty_pane() + 1li;
    if (f.panes == 0u) {
        let base = (p.ring * p.cap + slot) * p.stride;
        if (as_int(cells[base + MAX_TS]) > p.at) {
            status = NOT_RETAINED;
        }
        add_cell(&acc, base, f.column);
    } else {
        lo = p_t - i64(f.panes) + 1li;
    }
    var head = empty_pane();
    for (var pos = 0u; pos < p.ring; pos++) {
        let cell = (pos * p.cap + slot) * p.stride;
        let tag = as_int(cells[cell + TAG]);
        head = max(head, tag);
        if (tag >= lo && tag <= p_t) {
            add_cell(&acc, cell, f.column);
            if (tag == p_t && as_int(cells[cell + MAX_TS]) > p.at) {
                status = max(status, PANE_HOLDS_LATER_EVENTS);
            }
        }
    }
    if (f.panes != 0u && head != empty_pane() && lo <= head - i64(p.ring)) {
        status = NOT_RETAINED;
    }
    if (status != 0u) {
        atomicMax(&out_status[key], status);
    }
    // Finalize (`level::finalize`).
    let n = acc.count;
    switch f.agg {
        case COUNT: {
            write(out, select(acc.rows, n, f.column != ABSENT), true);
        }
        case SUM: {
            write(out, acc.sum, true);
        }
        case MEAN: {
            write(out, acc.sum / n, n > 0.0lf);
        }
        case MIN: {
            write(out, acc.lo, n > 0.0lf);
        }
        case MAX: {
            write(out, acc.hi, n > 0.0lf);
        }
        case VAR, STD: {
            var v = acc.moments.m2 / (n - 1.0lf);
            if (f.agg == STD) {
                v = sqrt(v);
            }
            write(out, v, n >= 2.0lf);
        }
        case LAST: {
            write(out, acc.last, n > 0.0lf);
        }
        case FIRST: {
            write(out, acc.first, n > 0.0lf);
        }
        default: {
            // DECAYED_SUM, DECAYED_COUNT: rescaled from the reference time to `at`.
            var s = 0.0lf;
            if (acc.decay.r != empty_pane()) {
                s = decay_weight(p.at - acc.decay.r, col(f.column).half_life);
            }
            write(out, select(acc.decay.w, acc.decay.xw, f.agg == DECAYED_SUM) * s, true);
        }
    }
}
