// Reading the fields of a cell. Prepended, after common.wgsl, to the kernels that
// bind `cols` (the word offsets of each column's fields) and `cells` (one hop level).

// Word offsets of column `c`'s fields.
struct Col {
    count: u32,
    sum: u32,
    moments: u32,
    min: u32,
    max: u32,
    last: u32,
    first: u32,
    decay: u32,
    // Of the decayed sums, ms.
    half_life: f64,
    // Sketch and list groups (sketches.wgsl): word offset (ABSENT when absent) and
    // parameter of each; the quantile keys' column in `values`.
    hll: u32,
    hll_precision: u32,
    quantile: u32,
    quantile_capacity: u32,
    quantile_keys: u32,
    last_n: u32,
    last_n_n: u32,
    top_k: u32,
    top_k_capacity: u32,
}

fn col(c: u32) -> Col {
    let o = c * COL_FIELDS;
    let half_life = f64(cols[o + 8u]) + f64(cols[o + 9u]) * 4294967296.0lf;
    return Col(cols[o], cols[o + 1u], cols[o + 2u], cols[o + 3u], cols[o + 4u], cols[o + 5u],
        cols[o + 6u], cols[o + 7u], half_life, cols[o + 10u], cols[o + 11u], cols[o + 12u],
        cols[o + 13u], cols[o + 14u], cols[o + 15u], cols[o + 16u], cols[o + 17u], cols[o + 18u]);
}

// The moments of column `k` of the cell at word `cell` (shift K, Σ(x−K), Σ(x−K)²).
fn cell_moments(k: Col, cell: u32) -> Moments {
    let n = cells[cell + k.count];
    if (n == 0.0lf) {
        return Moments(0.0lf, 0.0lf, 0.0lf);
    }
    let m1 = cells[cell + k.moments + 1u];
    return Moments(n, cells[cell + k.moments] + m1 / n, centred_m2(cells[cell + k.moments + 2u], m1, n));
}
