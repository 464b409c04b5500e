//! Asset manifests of every supported format: arbitrary JSON never panics, and every listed URL
//! is a path or an absolute URL.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for name in ["manifest.json", ".manifest.json", "staticfiles.json"] {
        if let Ok((_, urls)) = sidecache::prime::parse_manifest(name, text, None) {
            for u in urls {
                assert!(u.starts_with('/') || u.starts_with("http://") || u.starts_with("https://"), "{u}");
            }
        }
    }
});
