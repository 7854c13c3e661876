//! Driving QEMU: choosing the accelerator, building the command line of a
//! VM whose disk is an NBD export, and talking QMP.
//!
//! spore does not emulate hardware. It starts `qemu-system-x86_64` with the
//! disk attached over NBD and controls it through its QMP socket.

pub mod accel;
pub mod channel;
pub mod cmdline;
pub mod migration;
pub mod qmp;
pub mod sockets;
pub mod state;

pub use accel::Accel;
pub use channel::{epoch_us, longest_gap, GuestChannel, Identity, Message, StallProbe};
pub use cmdline::{Incoming, RamFile, VmSpec, MEMORY_SLOTS, QEMU_BINARY};
pub use migration::{MemoryLayout, MigrationTls, Progress};
pub use qmp::{Qmp, QmpError};
