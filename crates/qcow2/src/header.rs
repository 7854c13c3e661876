//! The qcow2 header and its extensions: parsing untrusted bytes into a
//! validated [`Header`], and encoding the header the writer emits.
//!
//! Everything here works on the bytes of the first cluster only; checks that
//! need the file length (tables inside the file) take it as an argument so
//! that parsing stays a pure function that is easy to test.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::Error;

pub(crate) const MAGIC: [u8; 4] = *b"QFI\xfb";
pub(crate) const V2_HEADER_LEN: u32 = 72;
pub(crate) const V3_MIN_HEADER_LEN: u32 = 104;
pub(crate) const MIN_CLUSTER_BITS: u32 = 9;
pub(crate) const MAX_CLUSTER_BITS: u32 = 21;

/// The largest L1 table we accept, in entries (32 MiB of table, QEMU's own
/// limit). Together with "the table lies inside the file" this bounds the
/// memory an untrusted header can make us allocate.
pub(crate) const MAX_L1_ENTRIES: u64 = 32 * 1024 * 1024 / 8;
/// The largest refcount table we accept, in bytes (QEMU's limit).
const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 * 1024 * 1024;
const MAX_BACKING_NAME: u32 = 1023;
const MAX_BACKING_FORMAT: u32 = 64;

pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(crate) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(crate) const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

pub(crate) const EXT_END: u32 = 0;
pub(crate) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub(crate) const EXT_FEATURE_NAMES: u32 = 0x6803_f857;

/// How compressed clusters are compressed (one method per image).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (no zlib header), the qcow2 default.
    Deflate,
    /// Zstandard frames (`compression_type=zstd`, version 3 only).
    Zstd,
}

/// A backing file as recorded in an image header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingFile {
    /// The name as stored: relative names are relative to the directory of
    /// the image that names them.
    pub path: PathBuf,
    /// The backing format header extension, if present (`"qcow2"`, `"raw"`).
    pub format: Option<String>,
}

/// A byte range of the image file, for overlap checks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Extent {
    pub start: u64,
    pub len: u64,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }

    pub fn overlaps(&self, other: &Extent) -> bool {
        self.len > 0 && other.len > 0 && self.start < other.end() && other.start < self.end()
    }
}

/// A parsed and validated qcow2 header.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub incompatible_features: u64,
    pub compression: Compression,
    pub backing: Option<BackingFile>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(w)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(w)
}

/// Whether `bytes` start with the qcow2 magic.
pub fn is_qcow2(header_bytes: &[u8]) -> bool {
    header_bytes.starts_with(&MAGIC)
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Number of L2 entries (each one guest cluster) per L2 table.
    pub fn l2_entries(&self) -> u64 {
        let entry_size = if self.extended_l2() { 16 } else { 8 };
        self.cluster_size() / entry_size
    }

    /// Number of L1 entries needed to map the whole virtual disk.
    pub fn l1_entries_needed(&self) -> u64 {
        self.size
            .div_ceil(self.cluster_size())
            .div_ceil(self.l2_entries())
    }

    pub fn l1_extent(&self) -> Extent {
        Extent {
            start: self.l1_table_offset,
            len: u64::from(self.l1_size) * 8,
        }
    }

    pub fn refcount_table_extent(&self) -> Extent {
        Extent {
            start: self.refcount_table_offset,
            len: u64::from(self.refcount_table_clusters) << self.cluster_bits,
        }
    }

    /// Parses the header at the start of `bytes` (the first cluster of the
    /// image, or the whole file if it is shorter) and checks it against the
    /// length of the image file.
    pub fn parse(bytes: &[u8], file_len: u64) -> Result<Header, Error> {
        let truncated = |needed: u64| Error::Truncated {
            needed,
            available: bytes.len() as u64,
        };
        if bytes.len() < 8 {
            return if bytes.len() >= 4 && !is_qcow2(bytes) {
                Err(Error::NotQcow2)
            } else {
                Err(truncated(u64::from(V2_HEADER_LEN)))
            };
        }
        if !is_qcow2(bytes) {
            return Err(Error::NotQcow2);
        }
        let version = be32(bytes, 4);
        if version != 2 && version != 3 {
            return Err(Error::UnsupportedVersion(version));
        }
        if bytes.len() < V2_HEADER_LEN as usize {
            return Err(truncated(u64::from(V2_HEADER_LEN)));
        }
        let backing_file_offset = be64(bytes, 8);
        let backing_file_size = be32(bytes, 16);
        let cluster_bits = be32(bytes, 20);
        let size = be64(bytes, 24);
        let crypt_method = be32(bytes, 32);
        let l1_size = be32(bytes, 36);
        let l1_table_offset = be64(bytes, 40);
        let refcount_table_offset = be64(bytes, 48);
        let refcount_table_clusters = be32(bytes, 56);

        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::corrupt(format!(
                "cluster_bits {cluster_bits} outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;

        let (incompatible, header_length, refcount_order) = if version == 2 {
            (0, V2_HEADER_LEN, 4)
        } else {
            if bytes.len() < V3_MIN_HEADER_LEN as usize {
                return Err(truncated(u64::from(V3_MIN_HEADER_LEN)));
            }
            (be64(bytes, 72), be32(bytes, 100), be32(bytes, 96))
        };
        if version == 3 {
            if header_length < V3_MIN_HEADER_LEN || header_length % 8 != 0 {
                return Err(Error::corrupt(format!(
                    "header length {header_length} invalid"
                )));
            }
            if u64::from(header_length) > cluster_size {
                return Err(Error::corrupt("header larger than a cluster"));
            }
            if bytes.len() < header_length as usize {
                return Err(truncated(u64::from(header_length)));
            }
        }
        if refcount_order > 6 {
            return Err(Error::corrupt(format!(
                "refcount order {refcount_order} above 6"
            )));
        }

        // Header extensions live between the header and the backing file
        // name (or the end of the first cluster).
        let cluster_end = cluster_size.min(bytes.len() as u64);
        let has_backing = backing_file_offset != 0;
        let ext_end = if has_backing {
            backing_file_offset.min(cluster_end)
        } else {
            cluster_end
        };
        let ext = parse_extensions(bytes, u64::from(header_length), ext_end)?;

        let unknown = incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Error::UnknownIncompatibleFeatures(describe_features(
                unknown,
                &ext.feature_names,
            )));
        }
        if crypt_method != 0 {
            return Err(Error::Encrypted(crypt_method));
        }
        if incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(Error::ExternalDataFile);
        }
        if incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(Error::MarkedCorrupt);
        }
        if incompatible & INCOMPAT_DIRTY != 0 {
            return Err(Error::Dirty);
        }
        if incompatible & INCOMPAT_EXTL2 != 0 && cluster_bits < 14 {
            return Err(Error::corrupt(
                "extended L2 entries need clusters of at least 16 KiB",
            ));
        }

        let compression_type = if header_length > V3_MIN_HEADER_LEN {
            bytes[V3_MIN_HEADER_LEN as usize]
        } else {
            0
        };
        let compression = if incompatible & INCOMPAT_COMPRESSION != 0 {
            match compression_type {
                1 => Compression::Zstd,
                0 => {
                    return Err(Error::corrupt(
                        "compression type bit set but compression type is zlib",
                    ))
                }
                other => return Err(Error::UnsupportedCompression(other)),
            }
        } else if compression_type != 0 {
            return Err(Error::corrupt(
                "compression type set without its incompatible feature bit",
            ));
        } else {
            Compression::Deflate
        };

        let backing = if has_backing {
            if backing_file_size > MAX_BACKING_NAME {
                return Err(Error::corrupt("backing file name too long"));
            }
            let start = backing_file_offset;
            let end = start.saturating_add(u64::from(backing_file_size));
            if start < u64::from(header_length) || end > cluster_size {
                return Err(Error::corrupt(
                    "backing file name outside the header cluster",
                ));
            }
            if end > bytes.len() as u64 {
                return Err(truncated(end));
            }
            let name = &bytes[start as usize..end as usize];
            if name.is_empty() || name.contains(&0) {
                return Err(Error::corrupt("backing file name empty or contains NUL"));
            }
            Some(BackingFile {
                path: PathBuf::from(OsStr::from_bytes(name)),
                format: ext.backing_format,
            })
        } else {
            None
        };

        let header = Header {
            version,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            incompatible_features: incompatible,
            compression,
            backing,
        };
        header.check_tables(file_len)?;
        Ok(header)
    }

    /// Checks that the L1 and refcount tables are sane, inside the file, and
    /// overlap neither the header nor each other.
    fn check_tables(&self, file_len: u64) -> Result<(), Error> {
        let cluster_size = self.cluster_size();
        let header_cluster = Extent {
            start: 0,
            len: cluster_size,
        };
        let needed = self.l1_entries_needed();
        if u64::from(self.l1_size) < needed {
            return Err(Error::corrupt(format!(
                "L1 table has {} entries, virtual size needs {needed}",
                self.l1_size
            )));
        }
        if u64::from(self.l1_size) > MAX_L1_ENTRIES {
            return Err(Error::corrupt(format!(
                "L1 table of {} entries is too large",
                self.l1_size
            )));
        }
        let l1 = self.l1_extent();
        if l1.len > 0 {
            if l1.start & (cluster_size - 1) != 0 {
                return Err(Error::corrupt("L1 table offset not cluster aligned"));
            }
            if l1.end() > file_len {
                return Err(Error::corrupt("L1 table beyond end of file"));
            }
            if l1.overlaps(&header_cluster) {
                return Err(Error::corrupt("L1 table overlaps the header"));
            }
        }

        let rt = self.refcount_table_extent();
        if rt.len > MAX_REFCOUNT_TABLE_BYTES {
            return Err(Error::corrupt("refcount table too large"));
        }
        if rt.len == 0 {
            return Err(Error::corrupt("image has no refcount table"));
        }
        if rt.start & (cluster_size - 1) != 0 {
            return Err(Error::corrupt("refcount table offset not cluster aligned"));
        }
        if rt.end() > file_len {
            return Err(Error::corrupt("refcount table beyond end of file"));
        }
        if rt.overlaps(&header_cluster) {
            return Err(Error::corrupt("refcount table overlaps the header"));
        }
        if rt.overlaps(&l1) {
            return Err(Error::corrupt("refcount table overlaps the L1 table"));
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Extensions {
    backing_format: Option<String>,
    /// (feature type, bit, name) from the feature name table.
    feature_names: Vec<(u8, u8, String)>,
}

fn parse_extensions(bytes: &[u8], start: u64, end: u64) -> Result<Extensions, Error> {
    let mut ext = Extensions::default();
    let mut at = start;
    while at + 8 <= end {
        let a = at as usize;
        let kind = be32(bytes, a);
        let len = u64::from(be32(bytes, a + 4));
        if kind == EXT_END {
            break;
        }
        let data_start = at + 8;
        if len > end - data_start {
            return Err(Error::corrupt(format!(
                "header extension {kind:#x} runs past the header cluster"
            )));
        }
        let data = &bytes[data_start as usize..(data_start + len) as usize];
        match kind {
            EXT_BACKING_FORMAT => {
                if len > u64::from(MAX_BACKING_FORMAT) {
                    return Err(Error::corrupt("backing format name too long"));
                }
                ext.backing_format = Some(String::from_utf8_lossy(data).into_owned());
            }
            EXT_FEATURE_NAMES => {
                for entry in data.chunks_exact(48) {
                    let name = &entry[2..];
                    let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                    ext.feature_names.push((
                        entry[0],
                        entry[1],
                        String::from_utf8_lossy(&name[..name_len]).into_owned(),
                    ));
                }
            }
            // Bitmaps, encryption header, external data file name and
            // anything unknown: not needed to read guest data, or refused
            // through a header field or feature bit.
            _ => {}
        }
        at = data_start + len.next_multiple_of(8);
    }
    Ok(ext)
}

fn describe_features(bits: u64, names: &[(u8, u8, String)]) -> String {
    let mut parts = Vec::new();
    for bit in 0..64u8 {
        if bits & (1 << bit) == 0 {
            continue;
        }
        match names.iter().find(|(t, b, _)| *t == 0 && *b == bit) {
            Some((_, _, name)) if !name.is_empty() => parts.push(format!("{name} (bit {bit})")),
            _ => parts.push(format!("bit {bit}")),
        }
    }
    parts.join(", ")
}

/// The fields the writer sets; everything else is zero.
pub(crate) struct NewHeader {
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub refcount_order: u32,
}

/// Header length the writer uses: the v3 fields plus the compression type
/// byte, padded to 8, as QEMU writes it.
pub(crate) const WRITER_HEADER_LEN: u32 = 112;

impl NewHeader {
    /// Encodes a version 3 header followed by an empty extension list.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(WRITER_HEADER_LEN as usize + 8);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&3u32.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes()); // backing_file_offset
        b.extend_from_slice(&0u32.to_be_bytes()); // backing_file_size
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes()); // crypt_method
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes()); // nb_snapshots
        b.extend_from_slice(&0u64.to_be_bytes()); // snapshots_offset
        b.extend_from_slice(&0u64.to_be_bytes()); // incompatible_features
        b.extend_from_slice(&0u64.to_be_bytes()); // compatible_features
        b.extend_from_slice(&0u64.to_be_bytes()); // autoclear_features
        b.extend_from_slice(&self.refcount_order.to_be_bytes());
        b.extend_from_slice(&WRITER_HEADER_LEN.to_be_bytes());
        b.resize(WRITER_HEADER_LEN as usize, 0); // compression_type 0 + padding
        b.extend_from_slice(&EXT_END.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE_LEN: u64 = 1 << 20;

    /// A valid v3 header with 64 KiB clusters for a 1 GiB disk, L1 table at
    /// cluster 3 and refcount table at cluster 1, as QEMU lays them out.
    fn valid() -> Vec<u8> {
        let mut b = NewHeader {
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            refcount_order: 4,
        }
        .encode();
        b.resize(4096, 0);
        b
    }

    fn put32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn put64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    fn parse(b: &[u8]) -> Result<Header, Error> {
        Header::parse(b, FILE_LEN)
    }

    fn corrupt_message(b: &[u8]) -> String {
        match parse(b) {
            Err(Error::Corrupt(msg)) => msg,
            other => panic!("expected corrupt, got {other:?}"),
        }
    }

    #[test]
    fn valid_header_parses() {
        let h = parse(&valid()).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.size, 1 << 30);
        assert_eq!(h.l1_entries_needed(), 2);
        assert_eq!(h.compression, Compression::Deflate);
        assert!(h.backing.is_none());
    }

    #[test]
    fn magic_detection() {
        assert!(is_qcow2(b"QFI\xfb\0\0\0\x03"));
        assert!(!is_qcow2(b"QFI"));
        assert!(!is_qcow2(b"\0\0\0\0QFI\xfb"));
    }

    #[test]
    fn truncated_headers_are_refused() {
        let b = valid();
        for len in [0, 3, 4, 7, 8, 50, 71, 72, 103] {
            match parse(&b[..len]) {
                Err(Error::Truncated { .. }) => {}
                other => panic!("length {len}: {other:?}"),
            }
        }
        // v3 header_length larger than what the file holds.
        let mut b = valid();
        put32(&mut b, 100, 4096);
        assert!(matches!(
            parse(&b[..200]),
            Err(Error::Truncated { needed: 4096, .. })
        ));
    }

    #[test]
    fn bad_magic_and_version() {
        let mut b = valid();
        b[0] = b'X';
        assert!(matches!(parse(&b), Err(Error::NotQcow2)));
        assert!(matches!(parse(&b[..5]), Err(Error::NotQcow2)));
        for version in [0, 1, 4, u32::MAX] {
            let mut b = valid();
            put32(&mut b, 4, version);
            assert!(
                matches!(parse(&b), Err(Error::UnsupportedVersion(v)) if v == version),
                "version {version}"
            );
        }
    }

    #[test]
    fn cluster_bits_out_of_range() {
        for bits in [0, 8, 22, 64, u32::MAX] {
            let mut b = valid();
            put32(&mut b, 20, bits);
            assert!(corrupt_message(&b).contains("cluster_bits"));
        }
    }

    #[test]
    fn l1_table_sizes_and_offsets_are_checked() {
        // Too small for the virtual size.
        let mut b = valid();
        put32(&mut b, 36, 1);
        assert!(corrupt_message(&b).contains("virtual size needs"));
        // A huge virtual size needs a huge L1 table, which is refused.
        let mut b = valid();
        put64(&mut b, 24, u64::MAX);
        put32(&mut b, 36, u32::MAX);
        assert!(corrupt_message(&b).contains("virtual size needs"));
        let mut b = valid();
        put32(&mut b, 36, u32::MAX);
        assert!(corrupt_message(&b).contains("too large"));
        // Large but within QEMU's limit: must still lie inside the file.
        let mut b = valid();
        put64(&mut b, 24, 1 << 50);
        put32(&mut b, 36, 1 << 21);
        assert!(corrupt_message(&b).contains("beyond end of file"));
        // Offset past the end of the file, or overflowing.
        let mut b = valid();
        put64(&mut b, 40, FILE_LEN);
        assert!(corrupt_message(&b).contains("beyond end of file"));
        let mut b = valid();
        put64(&mut b, 40, !0xffff);
        assert!(corrupt_message(&b).contains("beyond end of file"));
        // Misaligned or inside the header.
        let mut b = valid();
        put64(&mut b, 40, (3 << 16) + 8);
        assert!(corrupt_message(&b).contains("aligned"));
        let mut b = valid();
        put64(&mut b, 40, 0);
        assert!(corrupt_message(&b).contains("overlaps the header"));
    }

    #[test]
    fn refcount_table_is_checked() {
        let mut b = valid();
        put64(&mut b, 48, 3 << 16);
        assert!(corrupt_message(&b).contains("overlaps the L1 table"));
        let mut b = valid();
        put32(&mut b, 56, 0);
        assert!(corrupt_message(&b).contains("no refcount table"));
        let mut b = valid();
        put32(&mut b, 56, u32::MAX);
        assert!(corrupt_message(&b).contains("too large"));
        let mut b = valid();
        put64(&mut b, 48, FILE_LEN);
        assert!(corrupt_message(&b).contains("beyond end of file"));
    }

    #[test]
    fn feature_bits() {
        type Check = fn(&Error) -> bool;
        let cases: [(u64, Check); 4] = [
            (INCOMPAT_DIRTY, |e| matches!(e, Error::Dirty)),
            (INCOMPAT_CORRUPT, |e| matches!(e, Error::MarkedCorrupt)),
            (INCOMPAT_DATA_FILE, |e| matches!(e, Error::ExternalDataFile)),
            (
                1 << 40,
                |e| matches!(e, Error::UnknownIncompatibleFeatures(s) if s == "bit 40"),
            ),
        ];
        for (bits, expected) in cases {
            let mut b = valid();
            put64(&mut b, 72, bits);
            let err = parse(&b).unwrap_err();
            assert!(expected(&err), "bits {bits:#x}: {err:?}");
        }
        // The dirty message tells how to repair.
        assert!(Error::Dirty.to_string().contains("qemu-img check -r all"));
        // Compatible and autoclear bits are ignored.
        let mut b = valid();
        put64(&mut b, 80, u64::MAX);
        put64(&mut b, 88, u64::MAX);
        parse(&b).unwrap();
    }

    #[test]
    fn unknown_feature_named_from_feature_table() {
        let mut b = valid();
        put64(&mut b, 72, 1 << 9);
        // Replace the end marker with a feature name table of one entry.
        let at = WRITER_HEADER_LEN as usize;
        put32(&mut b, at, EXT_FEATURE_NAMES);
        put32(&mut b, at + 4, 48);
        b[at + 8] = 0;
        b[at + 9] = 9;
        b[at + 10..at + 19].copy_from_slice(b"time warp");
        match parse(&b) {
            Err(Error::UnknownIncompatibleFeatures(s)) => assert_eq!(s, "time warp (bit 9)"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn encryption_is_refused() {
        for method in [1, 2, 77] {
            let mut b = valid();
            put32(&mut b, 32, method);
            assert!(matches!(parse(&b), Err(Error::Encrypted(m)) if m == method));
        }
    }

    #[test]
    fn compression_type_must_match_its_bit() {
        let mut b = valid();
        b[104] = 1;
        assert!(corrupt_message(&b).contains("without its incompatible feature bit"));
        put64(&mut b, 72, INCOMPAT_COMPRESSION);
        assert_eq!(parse(&b).unwrap().compression, Compression::Zstd);
        b[104] = 0;
        assert!(corrupt_message(&b).contains("compression type bit set"));
        b[104] = 2;
        assert!(matches!(parse(&b), Err(Error::UnsupportedCompression(2))));
        // Header too short to hold the field: the bit cannot be honoured.
        put32(&mut b, 100, 104);
        assert!(corrupt_message(&b).contains("compression type bit set"));
    }

    #[test]
    fn extension_running_past_the_cluster_is_refused() {
        let mut b = valid();
        let at = WRITER_HEADER_LEN as usize;
        put32(&mut b, at, 0x1234_5678);
        put32(&mut b, at + 4, u32::MAX);
        assert!(corrupt_message(&b).contains("header extension"));
        // An unknown extension that fits is skipped.
        put32(&mut b, at + 4, 5);
        parse(&b).unwrap();
    }

    #[test]
    fn backing_file_name_and_format() {
        let mut b = valid();
        let ext = WRITER_HEADER_LEN as usize;
        put32(&mut b, ext, EXT_BACKING_FORMAT);
        put32(&mut b, ext + 4, 3);
        b[ext + 8..ext + 11].copy_from_slice(b"raw");
        put32(&mut b, ext + 16, EXT_END);
        put32(&mut b, ext + 20, 0);
        put64(&mut b, 8, 1024);
        put32(&mut b, 16, 8);
        b[1024..1032].copy_from_slice(b"base.img");
        let h = parse(&b).unwrap();
        assert_eq!(
            h.backing,
            Some(BackingFile {
                path: PathBuf::from("base.img"),
                format: Some("raw".into())
            })
        );
        // Name too long, outside the header cluster, inside the header.
        let mut long = b.clone();
        put32(&mut long, 16, 5000);
        assert!(corrupt_message(&long).contains("too long"));
        let mut outside = b.clone();
        put64(&mut outside, 8, 65530);
        assert!(corrupt_message(&outside).contains("outside the header cluster"));
        let mut overflow = b.clone();
        put64(&mut overflow, 8, u64::MAX - 2);
        assert!(corrupt_message(&overflow).contains("outside the header cluster"));
        let mut inside = b.clone();
        put64(&mut inside, 8, 16);
        assert!(corrupt_message(&inside).contains("outside the header cluster"));
        // The name lies beyond what the file holds.
        assert!(matches!(parse(&b[..1028]), Err(Error::Truncated { .. })));
    }

    #[test]
    fn version_2_header() {
        let mut b = valid();
        put32(&mut b, 4, 2);
        // v3 fields are ignored for v2, even garbage feature bits.
        put64(&mut b, 72, u64::MAX);
        let h = parse(&b[..72]).unwrap();
        assert_eq!(h.version, 2);
        assert_eq!(h.incompatible_features, 0);
    }

    #[test]
    fn extended_l2_needs_16k_clusters() {
        let mut b = valid();
        put64(&mut b, 72, INCOMPAT_EXTL2);
        // Entries are twice as large, so the same disk needs twice the L1.
        assert!(corrupt_message(&b).contains("virtual size needs 4"));
        put32(&mut b, 36, 4);
        assert!(parse(&b).unwrap().extended_l2());
        put32(&mut b, 20, 13);
        put32(&mut b, 36, 1 << 12);
        put64(&mut b, 40, 3 << 13);
        put64(&mut b, 48, 1 << 13);
        assert!(corrupt_message(&b).contains("extended L2"));
    }
}
