//! Driving QEMU: command lines, accelerator choice, QMP client
