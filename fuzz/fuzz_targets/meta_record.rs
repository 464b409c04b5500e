//! The on-disk metadata record: decoding arbitrary bytes never panics, and whatever decodes
//! re-encodes to a record that decodes to the same value, of the length `encoded_len` counts.
//! Each input is tried as a whole record, as the payload of a correctly checksummed one (so the
//! field decoding is reached too), and as the tail of an object file (record and footer). The
//! same for a compressed variant's record: whatever decodes re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sidecache::cache::meta::Meta;

fn check(bytes: &[u8]) {
    if let Ok(meta) = Meta::decode(bytes) {
        let encoded = meta.encode();
        assert_eq!(meta.encoded_len(), encoded.len() as u64);
        let again = Meta::decode(&encoded).expect("an encoded record decodes");
        assert_eq!(again, meta);
        let tail = sidecache::cache::store::tail(&meta);
        assert_eq!(sidecache::cache::store::tail_len(&meta), tail.len() as u64);
        assert_eq!(sidecache::cache::store::decode_tail(&tail).expect("a tail decodes"), meta);
    }
}

fn check_variant(bytes: &[u8]) {
    use sidecache::cache::store::VariantRecord;
    if let Ok(record) = VariantRecord::decode(bytes) {
        assert_eq!(record.encode(), bytes, "a variant record re-encodes to its bytes");
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    check_variant(data);
    // A variant record's fields under a correct magic and checksum.
    if data.len() >= 81 {
        let mut record = b"SCVAR001".to_vec();
        record.extend_from_slice(&data[..81]);
        let sum = blake3::hash(&record);
        record.extend_from_slice(&sum.as_bytes()[..16]);
        check_variant(&record);
    }
    let _ = sidecache::cache::store::decode_tail(data);
    let mut record = b"SCMETA02".to_vec();
    record.extend_from_slice(&(data.len() as u32).to_be_bytes());
    record.extend_from_slice(data);
    let sum = blake3::hash(&record);
    record.extend_from_slice(&sum.as_bytes()[..16]);
    check(&record);
});
