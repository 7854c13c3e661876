//! Origin image records (spore-origin) on arbitrary bytes, as a host reads
//! them from an origin store or a bucket. Nothing may panic; what decodes
//! re-encodes to a record that decodes the same.

#![no_main]

use libfuzzer_sys::fuzz_target;
use spore_origin::ImageRecord;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = ImageRecord::decode(data) {
        assert_eq!(ImageRecord::decode(&record.encode()).unwrap(), record);
    }
});
