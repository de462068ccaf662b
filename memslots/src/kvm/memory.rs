//! Host memory owned by the library: the only memory a slot may be created over.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::mmap::MmapRegionError;
use vm_memory::{FileOffset, MmapRegion};

use crate::model::PAGE_SIZE;

/// Why host memory could not be had.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// `mmap` failed.
    #[error("cannot map {size} bytes of host memory")]
    Map {
        /// Bytes asked for.
        size: u64,
        /// The cause.
        #[source]
        source: MmapRegionError,
    },
    /// `memfd_create` or sizing the file failed (for hugetlbfs: no huge pages reserved?).
    #[error("cannot create a {size}-byte memfd{}", if *.hugetlb { " on hugetlbfs" } else { "" })]
    Memfd {
        /// Bytes asked for.
        size: u64,
        /// Whether huge pages were asked for.
        hugetlb: bool,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// 2 MiB, the huge page size `Backing::memfd` uses with hugetlbfs.
pub const HUGE_PAGE: u64 = 2 << 20;

/// One host mapping behind guest memory: anonymous, or a shared memfd (optionally on hugetlbfs).
#[derive(Debug)]
pub struct Backing {
    name: String,
    region: MmapRegion<()>,
}

impl Backing {
    /// Maps `size` bytes (rounded up to pages) of anonymous memory.
    pub fn anonymous(name: &str, size: u64) -> Result<Self, MemoryError> {
        let size = size.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        Ok(Backing {
            name: name.to_owned(),
            region: MmapRegion::new(size as usize)
                .map_err(|source| MemoryError::Map { size, source })?,
        })
    }

    /// Maps `size` bytes of a new memfd, shared (so another process, or a vhost-user backend,
    /// can map the same memory); with `hugetlb`, on 2 MiB huge pages (`size` rounded up to them).
    pub fn memfd(name: &str, size: u64, hugetlb: bool) -> Result<Self, MemoryError> {
        let unit = if hugetlb { HUGE_PAGE } else { PAGE_SIZE };
        let size = size.div_ceil(unit) * unit;
        let err = |source| MemoryError::Memfd {
            size,
            hugetlb,
            source,
        };
        let cname = CString::new(name.replace('\0', " ")).expect("no NUL left");
        let mut flags = libc::MFD_CLOEXEC;
        if hugetlb {
            flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
        }
        // SAFETY: `cname` is a valid C string; the call has no other preconditions.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
        if fd < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(err)?;
        let region = MmapRegion::from_file(FileOffset::new(file, 0), size as usize)
            .map_err(|source| MemoryError::Map { size, source })?;
        Ok(Backing {
            name: name.to_owned(),
            region,
        })
    }

    /// Host address of the first byte.
    pub fn host(&self) -> u64 {
        self.region.as_ptr() as u64
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.region.size() as u64
    }

    /// The name given at creation.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `[host, host + size)` lies inside this backing.
    pub fn holds(&self, host: u64, size: u64) -> bool {
        host >= self.host()
            && host
                .checked_add(size)
                .is_some_and(|e| e <= self.host() + self.size())
    }

    /// A pointer to the byte at `host`, which must lie inside this backing.
    pub fn ptr(&self, host: u64) -> *mut u8 {
        assert!(
            self.holds(host, 1),
            "{host:#x} is outside backing {}",
            self.name
        );
        // The offset is in bounds (checked above), so this stays inside the mapping.
        self.region
            .as_ptr()
            .wrapping_add((host - self.host()) as usize)
    }

    /// Reads the u32 at `host` (volatile: the guest may be writing it).
    pub fn read_u32(&self, host: u64) -> u32 {
        assert!(self.holds(host, 4) && host % 4 == 0);
        // SAFETY: in bounds and aligned (checked above); the mapping lives as long as `self`.
        unsafe { std::ptr::read_volatile(self.ptr(host) as *const u32) }
    }

    /// Writes the u32 at `host` (volatile: the guest may be reading it).
    pub fn write_u32(&self, host: u64, value: u32) {
        assert!(self.holds(host, 4) && host % 4 == 0);
        // SAFETY: in bounds and aligned (checked above); the mapping lives as long as `self`.
        unsafe { std::ptr::write_volatile(self.ptr(host) as *mut u32, value) }
    }

    /// Copies `bytes` to `host` inside this backing.
    pub fn write_bytes(&self, host: u64, bytes: &[u8]) {
        assert!(self.holds(host, bytes.len() as u64));
        // SAFETY: the destination range is inside the mapping (checked above) and cannot overlap
        // the source, which is Rust-owned memory.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr(host), bytes.len()) }
    }
}

/// Every backing of one VM: the memory slots may be created over. A backing is unmapped when
/// the last `Arc` to it goes; the [`SlotTable`](super::SlotTable) holds one for every slot it
/// made over it, so dropping a `HostMemory` never unmaps memory a KVM slot still refers to.
#[derive(Debug, Default)]
pub struct HostMemory {
    backings: Vec<std::sync::Arc<Backing>>,
}

impl HostMemory {
    /// Adds a backing; returns it, shared.
    pub fn add(&mut self, backing: Backing) -> std::sync::Arc<Backing> {
        let backing = std::sync::Arc::new(backing);
        self.backings.push(backing.clone());
        backing
    }

    /// The backing holding all of `[host, host + size)`.
    pub fn owner(&self, host: u64, size: u64) -> Option<&std::sync::Arc<Backing>> {
        self.backings.iter().find(|b| b.holds(host, size.max(1)))
    }

    /// The backing holding `host`, with its index.
    pub fn locate(&self, host: u64) -> Option<(usize, &Backing)> {
        self.backings
            .iter()
            .enumerate()
            .find(|(_, b)| b.holds(host, 1))
            .map(|(i, b)| (i, &**b))
    }
}
