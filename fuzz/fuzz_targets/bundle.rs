//! Template bundles (spore-image's bundle format: metadata and device
//! state), as a host reads them from an origin. The raw bytes first, then
//! the same bytes as the payload of a valid envelope, so that the fuzzer
//! gets past the checksum to the header and sections. Nothing may panic;
//! what decodes re-encodes to a bundle that decodes the same.

#![no_main]

use libfuzzer_sys::fuzz_target;
use spore_image::bundle::{Bundle, BUNDLE_MAGIC, BUNDLE_VERSION};
use spore_image::envelope;

fuzz_target!(|data: &[u8]| {
    for bytes in [
        data.to_vec(),
        envelope::seal(BUNDLE_MAGIC, BUNDLE_VERSION, data),
    ] {
        if let Ok(bundle) = Bundle::decode(&bytes) {
            for (name, section) in &bundle.sections {
                assert_eq!(bundle.section(name), Some(section.as_slice()));
            }
            assert_eq!(Bundle::decode(&bundle.encode()).unwrap(), bundle);
        }
    }
});
