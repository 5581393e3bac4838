#![no_main]
//! Fuzz target: see `panes_engine::fuzz::kafka_message`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    panes_engine::fuzz::kafka_message(data);
});
