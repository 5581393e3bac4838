#![no_main]
//! Fuzz target: see `panes_engine::fuzz::arrow_ipc`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    panes_engine::fuzz::arrow_ipc(data);
});
