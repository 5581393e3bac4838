// Shared by every Panes kernel that reads or writes pane cells. Prepended to each
// kernel's source (WGSL has no includes); mirrors `panes_kernels::level`.
//
// A cell is `stride` f64 words: [tag, rows, max_ts | per value column: count, sum,
// K, Σ(x−K), Σ(x−K)², min, max, last, last_ts, first, first_ts, decay_ts, Σw, Σxw
// (present fields only)]. Integer fields (pane tag, times) are the bits of an i64
// stored in an f64 word.

const TAG: u32 = 0u;
const ROWS: u32 = 1u;
const MAX_TS: u32 = 2u;
// Word offset of an absent field in `cols`.
const ABSENT: u32 = 0xffffffffu;
// Words per column in `cols`: the offsets of count, sum, moments, min, max, last,
// first and decay, then the half-life in ms as two u32 halves (low first), then the
// sketch groups (`Col`), then one unused word.
const COL_FIELDS: u32 = 20u;

// Tag of a cell never written (i64::MIN; naga's constant evaluator has no i64
// arithmetic, so it is a function).
fn empty_pane() -> i64 {
    return bitcast<i64>(0x8000000000000000lu);
}

// The `first_ts` of a cell with no value (i64::MAX).
fn no_first() -> i64 {
    return bitcast<i64>(0x7ffffffffffffffflu);
}

fn as_int(x: f64) -> i64 {
    return bitcast<i64>(x);
}

fn as_word(x: i64) -> f64 {
    return bitcast<f64>(x);
}

// `a < b` in the order of `min`: IEEE 754-2019 `minimum`, −0.0 below +0.0, so that a
// minimum over any grouping of the same values has the same bits (`level::below`).
fn below(a: f64, b: f64) -> bool {
    return a < b || (a == b && bitcast<i64>(a) < bitcast<i64>(b));
}

// `a > b` in the order of `max`: +0.0 above −0.0 (`level::above`).
fn above(a: f64, b: f64) -> bool {
    return a > b || (a == b && bitcast<i64>(a) > bitcast<i64>(b));
}

// NaN test on the bits: a compiler may not fold `x != x` away.
fn is_nan(x: f64) -> bool {
    let b = bitcast<u64>(x);
    return (b & 0x7ff0000000000000lu) == 0x7ff0000000000000lu
        && (b & 0x000ffffffffffffflu) != 0lu;
}

fn is_finite(x: f64) -> bool {
    return (bitcast<u64>(x) & 0x7ff0000000000000lu) != 0x7ff0000000000000lu;
}

fn div_euclid(a: i64, b: i64) -> i64 {
    let q = a / b;
    if (a % b < 0li) {
        return q - 1li;
    }
    return q;
}

fn rem_euclid(a: i64, b: i64) -> i64 {
    let r = a % b;
    if (r < 0li) {
        return r + b;
    }
    return r;
}

// 2^n for an integer n in [−1022, 1023], from its bits.
fn pow2i(n: i32) -> f64 {
    return bitcast<f64>(u64(u32(n + 1023)) << 52u);
}

// 2^x in f64 (WGSL has no f64 `exp2`): x = n + f with n an integer and |f| ≤ 1/2, then
// e^(f·ln 2) by its Taylor series to the 13th power (truncation below 1e-17) and the
// exponent put in from n's bits. Agrees with the CPU's `exp2` to an ulp or two.
fn exp2_f64(x: f64) -> f64 {
    if (x < -1080.0lf) {
        return 0.0lf;
    }
    if (x > 1023.0lf) {
        return bitcast<f64>(0x7ff0000000000000lu);
    }
    let n = floor(x + 0.5lf);
    let y = (x - n) * 0.6931471805599453lf;
    var r = 1.0lf;
    for (var k = 13; k >= 1; k--) {
        r = 1.0lf + r * y / f64(k);
    }
    let ni = i32(n);
    if (ni < -1022) {
        return r * pow2i(ni + 60) * pow2i(-60);
    }
    return r * pow2i(ni);
}

// `level::decay_weight`: 2^(−delta / half_life).
fn decay_weight(delta: i64, half_life: f64) -> f64 {
    return exp2_f64(-f64(delta) / half_life);
}

// Decayed sums: reference time (the latest added), Σ 2^(−(r − ts)/h), Σ x·2^(−(r − ts)/h).
struct Decay {
    r: i64,
    w: f64,
    xw: f64,
}

// `level::decay_merge`: `b` merged into `a`, both rescaled to the later reference.
fn decay_merge(a: Decay, b: Decay, half_life: f64) -> Decay {
    if (b.r == empty_pane()) {
        return a;
    }
    if (a.r == empty_pane()) {
        return b;
    }
    if (b.r > a.r) {
        let s = decay_weight(b.r - a.r, half_life);
        return Decay(b.r, a.w * s + b.w, a.xw * s + b.xw);
    }
    let s = decay_weight(a.r - b.r, half_life);
    return Decay(a.r, a.w + b.w * s, a.xw + b.xw * s);
}

// Count, mean and centred second moment of some values (Chan et al.).
struct Moments {
    n: f64,
    mean: f64,
    m2: f64,
}

// M2 from a cell's shifted sums, IEEE like numpy: `level::centred_m2`. NaN and
// infinities propagate; only rounding below a true zero is clamped (WGSL's `max` may
// drop a NaN, so the clamp is a select).
fn centred_m2(sum_sq: f64, m1: f64, n: f64) -> f64 {
    if (sum_sq == bitcast<f64>(0x7ff0000000000000lu) && is_finite(m1)) {
        return sum_sq;
    }
    let m2 = sum_sq - m1 * m1 / n;
    return select(m2, 0.0lf, m2 < 0.0lf);
}

fn moments_merge(a: Moments, b: Moments) -> Moments {
    if (b.n == 0.0lf) {
        return a;
    }
    if (a.n == 0.0lf) {
        return b;
    }
    let n = a.n + b.n;
    let delta = b.mean - a.mean;
    return Moments(n, a.mean + delta * (b.n / n), a.m2 + b.m2 + delta * delta * (a.n * b.n / n));
}

// Linear index of a workgroup-sized kernel's thread over a 2-D dispatch (a dispatch
// has at most 65 535 workgroups per dimension).
fn thread_index(wg: vec3<u32>, nwg: vec3<u32>, lid: u32, size: u32) -> u32 {
    return (wg.y * nwg.x + wg.x) * size + lid;
}

