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
            let end = start + u64::from(backing_file_size);
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
