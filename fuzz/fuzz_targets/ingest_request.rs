#![no_main]
//! Fuzz target: see `panes_engine::fuzz::ingest_request`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    panes_engine::fuzz::ingest_request(data);
});
