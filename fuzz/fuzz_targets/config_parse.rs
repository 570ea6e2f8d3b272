//! Any text: `parse` returns, with a config or located errors, and never
//! panics, overflows its stack or runs out of memory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = lobby::config::parse(text, std::path::Path::new("fuzz.yaml"));
    }
});
