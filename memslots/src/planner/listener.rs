//! The QEMU-style listener API (filled in below).
