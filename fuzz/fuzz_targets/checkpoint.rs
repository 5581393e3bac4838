#![no_main]
//! Fuzz target: see `panes_engine::fuzz::checkpoint`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    panes_engine::fuzz::checkpoint(data);
});
