#![no_main]
//! Fuzz target: see `panes_engine::fuzz::feature_file`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    panes_engine::fuzz::feature_file(data);
});
