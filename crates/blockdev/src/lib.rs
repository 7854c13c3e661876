//! Virtual block devices: an image's flat map plus a writable 4 KiB overlay
