//! The gateway's YAML configuration (`gateway/src/config.rs`, its `keys:` list streamed by
//! `aihub-yamlconf`) from arbitrary text: parsing and checking give a value or a
//! `ConfigError`, never a panic, and an error names a key path that is printable.
#![no_main]

use std::path::Path;

use aihub_gateway::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("fuzz.yaml");
    match Config::parse(text, file) {
        Ok(config) => {
            // `check` reads TLS and price files named by the text: never a device or a pipe.
            if ["/dev", "/proc", "/sys", "fifo"]
                .iter()
                .any(|d| text.contains(d))
            {
                return;
            }
            if let Err(e) = config.check(file) {
                assert!(!e.to_string().is_empty());
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
