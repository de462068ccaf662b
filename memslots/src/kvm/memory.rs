//! Host memory owned by the library: the only memory a slot may be created over.

use vm_memory::mmap::MmapRegionError;
use vm_memory::MmapRegion;

use crate::model::PAGE_SIZE;

/// One anonymous host mapping behind guest memory.
#[derive(Debug)]
pub struct Backing {
    name: String,
    region: MmapRegion<()>,
}

impl Backing {
    /// Maps `size` bytes (rounded up to pages) of anonymous memory.
    pub fn anonymous(name: &str, size: u64) -> Result<Self, MmapRegionError> {
        let size = size.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        Ok(Backing {
            name: name.to_owned(),
            region: MmapRegion::new(size as usize)?,
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

/// Every backing of one VM. Backings live as long as the VM: memory is never unmapped while a
/// slot or a device-side snapshot could still point into it.
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
    pub fn owner(&self, host: u64, size: u64) -> Option<&Backing> {
        self.backings
            .iter()
            .map(|b| &**b)
            .find(|b| b.holds(host, size.max(1)))
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
