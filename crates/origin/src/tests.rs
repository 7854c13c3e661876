use std::io::Write;

use spore_chunks::{ChunkStore, Compression};

use super::*;

/// An image imported into a chunk store, as a pushing host has it.
struct Pushed {
    _dir: tempfile::TempDir,
    store: ChunkStore,
    manifest: ChunkId,
    layer: ChunkId,
    data: Vec<ChunkId>,
    profile: ChunkId,
}

impl Pushed {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path().join("chunks"), Compression::Zstd).unwrap();
        let raw = dir.path().join("img.raw");
        let mut f = std::fs::File::create(&raw).unwrap();
        // Eight distinct 64 KiB blocks, some compressible, then a zero one.
        for b in 0..8u32 {
            let block: Vec<u8> = (0..65536u32)
                .map(|i| {
                    if b % 2 == 0 {
                        (b * 31 + i % 97) as u8
                    } else {
                        (i.wrapping_mul(2654435761).wrapping_add(b) >> 13) as u8
                    }
                })
                .collect();
            f.write_all(&block).unwrap();
        }
        f.write_all(&[0u8; 65536]).unwrap();
        drop(f);
        let src = spore_image::source::open(&raw).unwrap();
        let p = spore_image::import(&store, &*src, "img.raw", 65536, None, &|_, _| {}).unwrap();
        let layer = p.manifest.layers[0];
        let data = spore_image::image::load_layer(&store, &layer)
            .unwrap()
            .chunks()
            .to_vec();
        assert_eq!(data.len(), 8);
        let profile = store
            .put(
                &spore_image::Profile {
                    block_size: 65536,
                    blocks: vec![3, 0, 1],
                }
                .encode(),
            )
            .unwrap()
            .id;
        Pushed {
            _dir: dir,
            store,
            manifest: p.id,
            layer,
            data,
            profile,
        }
    }

    async fn push(&self, origin: &OriginStore, ids: &[ChunkId]) {
        for id in ids {
            let raw = self.store.get_raw(id).unwrap().unwrap();
            origin.put_chunk(*id, raw.into()).await.unwrap();
        }
    }
}

fn local() -> (tempfile::TempDir, OriginStore) {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("origin");
    let s = OriginStore::open(spec.to_str().unwrap()).unwrap();
    (dir, s)
}

#[test]
fn open_takes_directories_file_urls_and_s3_urls_and_rejects_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("a/b");
    let s = OriginStore::open(plain.to_str().unwrap()).unwrap();
    assert!(plain.is_dir(), "the directory is created");
    assert_eq!(s.spec(), plain.to_str().unwrap());
    let url = format!("file://{}", dir.path().join("c").display());
    OriginStore::open(&url).unwrap();
    assert!(dir.path().join("c").is_dir());

    let err = |spec: &str| OriginStore::open(spec).unwrap_err().to_string();
    assert!(err("").contains("expected a directory"), "{}", err(""));
    assert!(err("gs://bucket").contains("expected a directory"));
    assert!(err("file://host/dir").contains("absolute path"));
    assert!(err("file://relative").contains("absolute path"));
    assert!(err("s3://").contains("names no bucket"));
    assert!(err("s3:///prefix").contains("names no bucket"));
}

#[tokio::test]
async fn chunks_are_stored_byte_for_byte_and_absent_ones_are_reported() {
    let (dir, origin) = local();
    let img = Pushed::new();
    let (a, b, c) = (img.data[0], img.data[1], img.data[2]);
    img.push(&origin, &[a, c]).await;
    assert_eq!(origin.missing(&[a, b, c]).await.unwrap(), vec![b]);
    assert_eq!(origin.missing(&[]).await.unwrap(), vec![]);
    let raws = origin.get_raws(&[c, b, a]).await.unwrap();
    let expect = |id| Some(Bytes::from(img.store.get_raw(id).unwrap().unwrap()));
    assert_eq!(raws, vec![expect(&c), None, expect(&a)]);
    // The layout is the documented one: chunks/<2 hex>/<hex>, the chunk file.
    let hex = a.to_hex();
    let on_disk =
        std::fs::read(dir.path().join("origin/chunks").join(&hex[..2]).join(&hex)).unwrap();
    assert_eq!(Some(Bytes::from(on_disk)), expect(&a));
    assert_eq!(origin.stats().chunks_written.load(Relaxed), 2);
    // Storing a chunk again is harmless.
    img.push(&origin, &[a]).await;
    assert_eq!(origin.get_raw(&a).await.unwrap(), expect(&a));
}

#[tokio::test]
async fn a_chunk_that_is_not_what_its_id_says_is_rejected() {
    let (_dir, origin) = local();
    let img = Pushed::new();
    let (a, b) = (img.data[0], img.data[1]);
    let raw_b = Bytes::from(img.store.get_raw(&b).unwrap().unwrap());
    let e = origin.put_chunk(a, raw_b).await.unwrap_err();
    assert!(matches!(e, OriginError::Rejected { .. }), "{e}");
    let e = origin
        .put_chunk(a, Bytes::from_static(b"SPCK garbage"))
        .await
        .unwrap_err();
    assert!(matches!(e, OriginError::Rejected { .. }), "{e}");
    assert_eq!(
        origin.missing(&[a]).await.unwrap(),
        vec![a],
        "nothing was stored"
    );
}

#[tokio::test]
async fn a_name_is_bound_only_once_everything_it_reaches_is_there() {
    let (dir, origin) = local();
    let img = Pushed::new();
    let rec = ImageRecord {
        manifest: img.manifest,
        profile: Some(img.profile),
    };
    let absent = |e: OriginError| match e {
        OriginError::Incomplete { absent, manifest } => {
            assert_eq!(manifest, img.manifest);
            absent
        }
        other => panic!("expected Incomplete, got {other}"),
    };
    assert!(matches!(
        origin.bind_image("img", &rec).await,
        Err(OriginError::NoManifest(m)) if m == img.manifest
    ));
    // The manifest alone: the layer and the profile are missing (the
    // layer's own chunks cannot be known until it is there).
    img.push(&origin, &[img.manifest]).await;
    assert_eq!(absent(origin.bind_image("img", &rec).await.unwrap_err()), 2);
    // With the layer, every data chunk it names counts.
    img.push(&origin, &[img.layer, img.profile]).await;
    assert_eq!(absent(origin.bind_image("img", &rec).await.unwrap_err()), 8);
    img.push(&origin, &img.data[..7]).await;
    assert_eq!(absent(origin.bind_image("img", &rec).await.unwrap_err()), 1);
    assert_eq!(
        origin.get_image("img").await.unwrap(),
        None,
        "not bound yet"
    );
    img.push(&origin, &img.data[7..]).await;
    origin.bind_image("img", &rec).await.unwrap();
    assert_eq!(origin.get_image("img").await.unwrap(), Some(rec));
    let on_disk = std::fs::read(dir.path().join("origin/images/img")).unwrap();
    assert_eq!(on_disk, rec.encode());

    // A profile that is not there keeps the name from moving.
    let other = ImageRecord {
        manifest: img.manifest,
        profile: Some(ChunkId::of(b"no such profile")),
    };
    assert_eq!(
        absent(origin.bind_image("img", &other).await.unwrap_err()),
        1
    );
    assert_eq!(origin.get_image("img").await.unwrap(), Some(rec));
    // Rebinding without a profile is fine.
    let plain = ImageRecord {
        manifest: img.manifest,
        profile: None,
    };
    origin.bind_image("img", &plain).await.unwrap();
    assert_eq!(origin.get_image("img").await.unwrap(), Some(plain));
}

#[tokio::test]
async fn a_manifest_that_is_not_a_manifest_is_an_error_not_a_binding() {
    let (_dir, origin) = local();
    let img = Pushed::new();
    // A data chunk, verified and stored, named as if it were a manifest.
    img.push(&origin, &[img.data[0]]).await;
    let rec = ImageRecord {
        manifest: img.data[0],
        profile: None,
    };
    let e = origin.bind_image("img", &rec).await.unwrap_err();
    assert!(matches!(e, OriginError::Image { .. }), "{e}");
    assert_eq!(origin.get_image("img").await.unwrap(), None);
}

#[tokio::test]
async fn bad_bytes_in_the_store_are_reported_not_served_as_records() {
    let (dir, origin) = local();
    assert_eq!(origin.get_image("nothing").await.unwrap(), None);
    let images = dir.path().join("origin/images");
    std::fs::create_dir_all(&images).unwrap();
    let m = ChunkId::of(b"m");
    for (name, bytes, want) in [
        ("junk", "not json".to_string(), "not an image record"),
        (
            "old",
            format!("{{\"manifest\":\"{m}\"}}"),
            "no format version",
        ),
        (
            "future",
            format!("{{\"version\":3,\"manifest\":\"{m}\"}}"),
            "version 3 is not supported",
        ),
        ("huge", " ".repeat(10_000), "over the limit"),
    ] {
        std::fs::write(images.join(name), bytes).unwrap();
        let e = origin.get_image(name).await.unwrap_err();
        let chain = {
            let mut s = e.to_string();
            let mut cur = std::error::Error::source(&e);
            while let Some(c) = cur {
                s.push_str(": ");
                s.push_str(&c.to_string());
                cur = c.source();
            }
            s
        };
        assert!(chain.contains(name), "{chain}");
        assert!(chain.contains(want), "{name}: {chain} (wanted {want})");
    }
    // A corrupt manifest object is found when a name is bound to it.
    let img = Pushed::new();
    let hex = img.manifest.to_hex();
    let path = dir.path().join("origin/chunks").join(&hex[..2]);
    std::fs::create_dir_all(&path).unwrap();
    let mut raw = img.store.get_raw(&img.manifest).unwrap().unwrap();
    let n = raw.len();
    raw[n - 1] ^= 0xff;
    std::fs::write(path.join(&hex), raw).unwrap();
    let rec = ImageRecord {
        manifest: img.manifest,
        profile: None,
    };
    let e = origin.bind_image("img", &rec).await.unwrap_err();
    assert!(matches!(e, OriginError::Corrupt { .. }), "{e}");
}
