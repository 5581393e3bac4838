// Sort: a bitonic sort of (key id, arrival index) pairs, ascending, so that each
// key's events form one run in arrival order (the fold's input). The arrival index
// makes every pair distinct, so the order is total and the result deterministic.
//
// The array length is a power of two ≥ TILE; padding pairs are (ABSENT, ABSENT) and
// sort last. Stages whose compare distance is below TILE run in workgroup memory
// (`sort_local`); wider ones run one compare-exchange per thread (`sort_global`).

const TILE: u32 = 512u;
const ABSENT: u32 = 0xffffffffu;

struct SortParams {
    // Bitonic block size of this stage (0 in `sort_local`: sort each tile whole).
    k: u32,
    // Compare distance (`sort_global` only).
    j: u32,
    // Pairs to fill (`sort_keys` only).
    n: u32,
}

@group(0) @binding(0) var<uniform> p: SortParams;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read_write> data: array<vec2<u32>>;

var<workgroup> tile: array<vec2<u32>, TILE>;

fn greater(a: vec2<u32>, b: vec2<u32>) -> bool {
    return a.x > b.x || (a.x == b.x && a.y > b.y);
}

fn linear(wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wg.y * nwg.x + wg.x;
}

// Fills the pairs: (ids[i], i) for the batch, padding after it.
@compute @workgroup_size(256)
fn sort_keys(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear(wg, nwg) * 256u + lid;
    if (i < p.n) {
        data[i] = vec2<u32>(ids[i], i);
    } else if (i < arrayLength(&data)) {
        data[i] = vec2<u32>(ABSENT, ABSENT);
    }
}

// Compare-exchange of pair i (global index `gi`, tile index `a`) with its partner at
// distance j, ascending where bit k of gi is clear.
fn exchange(a: u32, j: u32, gi: u32, k: u32) {
    let b = a + j;
    let x = tile[a];
    let y = tile[b];
    if (greater(x, y) == ((gi & k) == 0u)) {
        tile[a] = y;
        tile[b] = x;
    }
}

@compute @workgroup_size(256)
fn sort_local(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let base = linear(wg, nwg) * TILE;
    tile[lid] = data[base + lid];
    tile[lid + 256u] = data[base + lid + 256u];
    workgroupBarrier();
    if (p.k == 0u) {
        for (var k = 2u; k <= TILE; k <<= 1u) {
            for (var j = k >> 1u; j > 0u; j >>= 1u) {
                let a = ((lid & ~(j - 1u)) << 1u) | (lid & (j - 1u));
                exchange(a, j, base + a, k);
                workgroupBarrier();
            }
        }
    } else {
        for (var j = TILE >> 1u; j > 0u; j >>= 1u) {
            let a = ((lid & ~(j - 1u)) << 1u) | (lid & (j - 1u));
            exchange(a, j, base + a, p.k);
            workgroupBarrier();
        }
    }
    data[base + lid] = tile[lid];
    data[base + lid + 256u] = tile[lid + 256u];
}

@compute @workgroup_size(256)
fn sort_global(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = linear(wg, nwg) * 256u + lid;
    let j = p.j;
    let a = ((t & ~(j - 1u)) << 1u) | (t & (j - 1u));
    let b = a + j;
    if (b >= arrayLength(&data)) {
        return;
    }
    let x = data[a];
    let y = data[b];
    if (greater(x, y) == ((a & p.k) == 0u)) {
        data[a] = y;
        data[b] = x;
    }
}
