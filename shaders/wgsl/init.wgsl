// Init: resets `count` cells starting at cell `first` to the identity cell (every
// field empty). Used when a level's device buffer is allocated or grown.

struct InitParams {
    first: u32,
    count: u32,
    stride: u32,
}

@group(0) @binding(0) var<uniform> p: InitParams;
@group(0) @binding(1) var<storage, read> identity: array<f64>;
@group(0) @binding(2) var<storage, read_write> cells: array<f64>;

@compute @workgroup_size(256)
fn init(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = thread_index(wg, nwg, lid, 256u);
    if (t >= p.count) {
        return;
    }
    let cell = (p.first + t) * p.stride;
    for (var w = 0u; w < p.stride; w++) {
        cells[cell + w] = identity[w];
    }
}
