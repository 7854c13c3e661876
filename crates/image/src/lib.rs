//! Images and layers: versioned on-disk formats, flat block map, import and export
