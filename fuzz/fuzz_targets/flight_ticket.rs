#![no_main]
//! Fuzz target: see `panes_engine::fuzz::flight_ticket`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    panes_engine::fuzz::flight_ticket(data);
});
