//! The on-disk metadata record: decoding arbitrary bytes never panics, and whatever decodes
//! re-encodes to a record that decodes to the same value. Each input is tried as a whole record
//! and as the payload of a correctly checksummed one, so the field decoding is reached too.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sidecache::cache::meta::Meta;

fn check(bytes: &[u8]) {
    if let Ok(meta) = Meta::decode(bytes) {
        let again = Meta::decode(&meta.encode()).expect("an encoded record decodes");
        assert_eq!(again, meta);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut record = b"SCMETA01".to_vec();
    record.extend_from_slice(&(data.len() as u32).to_be_bytes());
    record.extend_from_slice(data);
    let sum = blake3::hash(&record);
    record.extend_from_slice(&sum.as_bytes()[..16]);
    check(&record);
});
