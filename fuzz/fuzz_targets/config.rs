//! The YAML configuration and the size parser: any input is a value or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = sidecache::config::parse_yaml(text);
        if let Ok(n) = sidecache::units::parse_size(text) {
            // A parsed size re-parses to itself as plain bytes.
            assert_eq!(sidecache::units::parse_size(&n.to_string()), Ok(n));
        }
    }
});
