//! Images and layers.
//!
//! An image is a stack of layers (sparse block → chunk maps) described by a
//! manifest. Manifests and layers are chunks themselves, so an image is
//! entirely content-addressed: its name is just a pointer to a manifest id.
//! Opening an image folds its layers into a [`FlatMap`] so that reads cost
//! the same at any depth. The formats are written down in docs/formats.md.

pub mod bundle;
pub mod envelope;
pub mod flatmap;
pub mod image;
pub mod layer;
pub mod manifest;
pub mod profile;
pub mod source;
pub mod transfer;

pub use bundle::Bundle;
pub use flatmap::FlatMap;
pub use image::{Image, ImageError, LayerStats, LayerWriter};
pub use layer::{Entry, Layer, LayerBuilder};
pub use manifest::Manifest;
pub use profile::Profile;
pub use source::{Format, Source};
pub use transfer::{export, import, Published, TransferError, DEFAULT_BLOCK_SIZE};
