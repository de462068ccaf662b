//! Registered host memory: the only memory a slot may be created over. The VMM registers what it
//! already has (an address range with an owner that keeps it mapped, a vm-memory `MmapRegion`),
//! or lets memslots map some; either way a slot or a device view holds the memory's `Arc`, so it
//! is unmapped only when the last slot and view referring to it go.

use std::any::Any;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
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
    /// Registered memory must be mapped writable (KVM makes a slot read-only, not the mapping).
    #[error("memory {name} is not mapped writable")]
    NotWritable {
        /// Its name.
        name: String,
    },
    /// Registered memory may not overlap other registered memory.
    #[error("memory {name} overlaps memory {other}, which is registered")]
    Overlap {
        /// The memory being registered.
        name: String,
        /// The registered memory it overlaps.
        other: String,
    },
    /// Registered memory must be a non-empty, page-aligned range that does not wrap.
    #[error("memory {name} at {host:#x}, {size:#x} bytes, is not a non-empty page-aligned range")]
    Unaligned {
        /// Its name.
        name: String,
        /// Its host address.
        host: u64,
        /// Its size.
        size: u64,
    },
}

/// 2 MiB, the huge page size `Backing::memfd` uses with hugetlbfs.
pub const HUGE_PAGE: u64 = 2 << 20;

/// One host mapping behind guest memory: the VMM's (registered with its owner, or a vm-memory
/// `MmapRegion`), or one memslots maps (anonymous, or a shared memfd, optionally on hugetlbfs).
pub struct Backing {
    name: String,
    host: u64,
    size: u64,
    file: Option<FileOffset>,
    /// Keeps the mapping alive; dropped (unmapping it, if it is the last owner) with the backing.
    _owner: Box<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backing")
            .field("name", &self.name)
            .field("host", &format_args!("{:#x}", self.host))
            .field("size", &format_args!("{:#x}", self.size))
            .field("file", &self.file.as_ref().map(|f| f.start()))
            .finish()
    }
}

impl Backing {
    /// Maps `size` bytes (rounded up to pages) of anonymous memory.
    pub fn anonymous(name: &str, size: u64) -> Result<Self, MemoryError> {
        let size = size.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let region = MmapRegion::<()>::new(size as usize)
            .map_err(|source| MemoryError::Map { size, source })?;
        Ok(Self::from_mmap_region(name, Arc::new(region)).expect("mmap returns whole pages"))
    }

    /// Registers memory the VMM mapped with vm-memory: the region's `Arc` keeps it mapped for as
    /// long as a slot or a view refers to it, and its file and offset (if any) go into the device
    /// view, so a vhost-user backend can be served from it. The region must be readable and
    /// writable (a read-only slot is made read-only by KVM, not by the mapping).
    pub fn from_mmap_region<B>(name: &str, region: Arc<MmapRegion<B>>) -> Result<Self, MemoryError>
    where
        B: Bitmap + Send + Sync + 'static,
    {
        let (host, size) = (region.as_ptr() as u64, region.size() as u64);
        // A read-only mapping would fault in the kernel on a guest write and crash a device
        // thread writing through the view.
        if region.prot() & libc::PROT_WRITE == 0 {
            return Err(MemoryError::NotWritable {
                name: name.to_owned(),
            });
        }
        let file = region.file_offset().cloned();
        // SAFETY: `region` maps `[host, host + size)` for as long as it lives, and it becomes the
        // backing's owner; a `MmapRegion` is only unmapped by its own drop.
        unsafe { Self::from_raw(name, host, size, file, region) }
    }

    /// Registers memory the VMM mapped itself: `[host, host + size)`, with the file and offset it
    /// maps (if any), kept alive by `owner`.
    ///
    /// # Safety
    ///
    /// `[host, host + size)` must be mapped readable and writable in this process for as long as
    /// `owner` lives, and nothing else may unmap or remap it meanwhile: slots and device views
    /// hold the backing (and so `owner`) while they refer to it, and rely on that alone. `file`,
    /// when given, must be the file and offset the first byte maps.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use memslots::kvm::Backing;
    /// use vm_memory::MmapRegion;
    ///
    /// // The VMM's own mapping (here a vm-memory region; any owner of a mapping will do).
    /// let ram = Arc::new(MmapRegion::<()>::new(0x10_0000).unwrap());
    /// let (host, size) = (ram.as_ptr() as u64, ram.size() as u64);
    /// // SAFETY: `ram` maps the range read-write until it is dropped, and nothing else unmaps it.
    /// let backing = unsafe { Backing::from_raw("ram", host, size, None, ram) }.unwrap();
    /// assert_eq!(backing.size(), 0x10_0000);
    /// ```
    pub unsafe fn from_raw(
        name: &str,
        host: u64,
        size: u64,
        file: Option<FileOffset>,
        owner: impl Any + Send + Sync,
    ) -> Result<Self, MemoryError> {
        if size == 0
            || host % PAGE_SIZE != 0
            || size % PAGE_SIZE != 0
            || host.checked_add(size).is_none()
        {
            return Err(MemoryError::Unaligned {
                name: name.to_owned(),
                host,
                size,
            });
        }
        Ok(Backing {
            name: name.to_owned(),
            host,
            size,
            file,
            _owner: Box::new(owner),
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
        let region = MmapRegion::<()>::from_file(FileOffset::new(file, 0), size as usize)
            .map_err(|source| MemoryError::Map { size, source })?;
        Ok(Self::from_mmap_region(name, Arc::new(region)).expect("mmap returns whole pages"))
    }

    /// Host address of the first byte.
    pub fn host(&self) -> u64 {
        self.host
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The file and offset the byte at `host` maps, if the memory is a file's.
    pub fn file_offset(&self, host: u64) -> Option<FileOffset> {
        let f = self.file.as_ref()?;
        let delta = host.checked_sub(self.host)?;
        Some(FileOffset::from_arc(f.arc().clone(), f.start() + delta))
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
        (self.host as *mut u8).wrapping_add((host - self.host) as usize)
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
    backings: Vec<Arc<Backing>>,
}

impl HostMemory {
    /// Adds a backing; returns it, shared.
    pub fn add(&mut self, backing: Backing) -> Arc<Backing> {
        let backing = Arc::new(backing);
        self.backings.push(backing.clone());
        backing
    }

    /// Removes a backing: no new slot may map it; slots and views that do keep it mapped.
    /// Returns whether it was registered.
    pub fn remove(&mut self, backing: &Arc<Backing>) -> bool {
        let before = self.backings.len();
        self.backings.retain(|b| !Arc::ptr_eq(b, backing));
        self.backings.len() != before
    }

    /// Host addresses where one registered backing ends and another begins, ascending: a map
    /// joins memory across them when it continues in GPA too, but a slot may not span them.
    pub fn edges(&self) -> Vec<u64> {
        let starts: std::collections::BTreeSet<u64> =
            self.backings.iter().map(|b| b.host()).collect();
        let mut out: Vec<u64> = self
            .backings
            .iter()
            .map(|b| b.host() + b.size())
            .filter(|end| starts.contains(end))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The backing holding all of `[host, host + size)`.
    pub fn owner(&self, host: u64, size: u64) -> Option<&Arc<Backing>> {
        self.backings.iter().find(|b| b.holds(host, size.max(1)))
    }

    /// A registered backing sharing a byte with `[host, host + size)`.
    pub fn overlapping(&self, host: u64, size: u64) -> Option<&Arc<Backing>> {
        let end = host.saturating_add(size);
        self.backings
            .iter()
            .find(|b| b.host() < end && host < b.host() + b.size())
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
