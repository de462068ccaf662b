//! Guest memory maps: what each guest-physical range maps to, independent of how it is cut into
//! slots (their JSON form is in `json.rs`, with the `serde` feature).

use std::fmt;
use std::path::PathBuf;

use crate::model::{Layout, SlotFlags, PAGE_SIZE};

/// One guest-physical range mapped to host memory.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Region {
    /// Address space (0 is normal memory, 1 is SMM on x86).
    pub address_space: u16,
    /// First guest-physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host address of the first byte.
    pub host: u64,
    /// `READONLY` and `LOG_DIRTY_PAGES`, as a slot covering the range must carry them.
    pub flags: SlotFlags,
}

impl Region {
    /// One past the last guest-physical address.
    pub const fn end(&self) -> u64 {
        self.gpa + self.size
    }

    /// Host address of `gpa`, which must fall in the region.
    pub const fn host_of(&self, gpa: u64) -> u64 {
        self.host + (gpa - self.gpa)
    }

    /// Whether `next` continues this region: adjacent in GPA and host memory, same flags.
    pub const fn continued_by(&self, next: &Region) -> bool {
        self.address_space == next.address_space
            && self.end() == next.gpa
            && self.host + self.size == next.host
            && self.flags.0 == next.flags.0
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "as{} [{:#x}, {:#x}) -> {:#x} flags {:?}",
            self.address_space,
            self.gpa,
            self.end(),
            self.host,
            self.flags
        )
    }
}

/// Why a set of regions is not a memory map.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum MapError {
    /// A region of size zero.
    #[error("{at}: size is zero")]
    Empty {
        /// Where (for example `regions[3]`).
        at: String,
    },
    /// A GPA, size or host address that is not a multiple of the page size.
    #[error("{at}: {what} {value:#x} is not a multiple of the page size (4 KiB)")]
    Unaligned {
        /// Where.
        at: String,
        /// Which value.
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// `gpa + size` or `host + size` does not fit 64 bits.
    #[error("{at}: range wraps around")]
    Wraps {
        /// Where.
        at: String,
    },
    /// Flags other than `LOG_DIRTY_PAGES` and `READONLY`.
    #[error("{at}: flags {flags:#x} are not LOG_DIRTY_PAGES (1) / READONLY (2)")]
    Flags {
        /// Where.
        at: String,
        /// The raw flags.
        flags: u32,
    },
    /// Two regions of one address space overlap.
    #[error("{at} overlaps {other} in address space {address_space} at gpa {gpa:#x}")]
    Overlap {
        /// The later region.
        at: String,
        /// The earlier region it overlaps.
        other: String,
        /// The address space.
        address_space: u16,
        /// The first GPA of the overlap.
        gpa: u64,
    },
    /// A region names a backing the map does not define.
    #[error("{at}: no backing named `{name}`")]
    NoBacking {
        /// Where.
        at: String,
        /// The name.
        name: String,
    },
    /// A region reaches past the end of its backing.
    #[error("{at}: offset {offset:#x} + size {size:#x} is past the end of backing `{name}` ({backing_size:#x})")]
    OutsideBacking {
        /// Where.
        at: String,
        /// The backing.
        name: String,
        /// Offset in the backing.
        offset: u64,
        /// Region size.
        size: u64,
        /// Backing size.
        backing_size: u64,
    },
    /// A region gives both `host` and `backing`, or neither.
    #[error("{at}: give either `host` or `backing` (with `offset`)")]
    HostOrBacking {
        /// Where.
        at: String,
    },
    /// The JSON text does not parse.
    #[error("{path}:{line}:{column}: {message}")]
    Json {
        /// The file (or `-`).
        path: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What serde_json says.
        message: String,
    },
    /// The file cannot be read.
    #[error("cannot read map {path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        message: String,
    },
    /// A semantic error in a file, with the file named.
    // The inner error is part of the message and deliberately not a `source`: error chains print
    // every source after the message, which printed it twice.
    #[error("{}: {inner}", path.display())]
    InFile {
        /// The file.
        path: PathBuf,
        /// The error.
        inner: Box<MapError>,
    },
}

/// A guest memory map: non-overlapping GPA ranges per address space, each mapped to host memory
/// with flags.
///
/// Only the mapping counts: regions that continue each other (adjacent in GPA and host memory,
/// same flags) are joined, so two maps are equal exactly when every GPA maps the same way.
///
/// ```
/// use memslots::model::SlotFlags;
/// use memslots::planner::{MemoryMap, Region};
///
/// let ram = |gpa, size| Region { address_space: 0, gpa, size, host: 0x7f00_0000_0000 + gpa,
///                                flags: SlotFlags::NONE };
/// let a = MemoryMap::new(vec![ram(0, 0x10_0000)]).unwrap();
/// let b = MemoryMap::new(vec![ram(0x8_0000, 0x8_0000), ram(0, 0x8_0000)]).unwrap();
/// assert_eq!(a, b);
/// assert!(MemoryMap::new(vec![ram(0, 0x2000), ram(0x1000, 0x1000)]).is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct MemoryMap {
    /// Sorted by (address space, gpa), non-overlapping, joined where they continue each other.
    regions: Vec<Region>,
}

fn check_region(r: &Region, at: impl Fn() -> String) -> Result<(), MapError> {
    if r.size == 0 {
        return Err(MapError::Empty { at: at() });
    }
    for (what, value) in [("gpa", r.gpa), ("size", r.size), ("host address", r.host)] {
        if value % PAGE_SIZE != 0 {
            return Err(MapError::Unaligned {
                at: at(),
                what,
                value,
            });
        }
    }
    if r.gpa.checked_add(r.size).is_none() || r.host.checked_add(r.size).is_none() {
        return Err(MapError::Wraps { at: at() });
    }
    let known = SlotFlags::LOG_DIRTY_PAGES | SlotFlags::READONLY;
    if r.flags.0 & !known.0 != 0 {
        return Err(MapError::Flags {
            at: at(),
            flags: r.flags.0,
        });
    }
    Ok(())
}

impl MemoryMap {
    /// A map of `regions` (any order); errors name regions by their index (`regions[i]`).
    pub fn new(regions: Vec<Region>) -> Result<Self, MapError> {
        Self::with_names(regions, |i| format!("regions[{i}]"))
    }

    /// Like [`MemoryMap::new`], naming region `i` with `name(i)` in errors.
    pub fn with_names(
        regions: Vec<Region>,
        name: impl Fn(usize) -> String,
    ) -> Result<Self, MapError> {
        for (i, r) in regions.iter().enumerate() {
            check_region(r, || name(i))?;
        }
        let mut order: Vec<usize> = (0..regions.len()).collect();
        order.sort_by_key(|&i| (regions[i].address_space, regions[i].gpa));
        for w in order.windows(2) {
            let (a, b) = (&regions[w[0]], &regions[w[1]]);
            if a.address_space == b.address_space && a.end() > b.gpa {
                let (first, second) = (w[0].min(w[1]), w[0].max(w[1]));
                return Err(MapError::Overlap {
                    at: name(second),
                    other: name(first),
                    address_space: a.address_space,
                    gpa: b.gpa,
                });
            }
        }
        let mut joined: Vec<Region> = Vec::with_capacity(regions.len());
        for i in order {
            let r = regions[i];
            match joined.last_mut() {
                Some(last) if last.continued_by(&r) => last.size += r.size,
                _ => joined.push(r),
            }
        }
        Ok(MemoryMap { regions: joined })
    }

    /// The mapping a layout's slots give, all address spaces.
    pub fn from_layout(layout: &Layout) -> Self {
        let mut slots: Vec<Region> = layout
            .slots()
            .map(|s| Region {
                address_space: s.id.address_space,
                gpa: s.gpa,
                size: s.size,
                host: s.host,
                flags: s.flags,
            })
            .collect();
        slots.sort_by_key(|r| (r.address_space, r.gpa));
        let mut joined: Vec<Region> = Vec::with_capacity(slots.len());
        for r in slots {
            match joined.last_mut() {
                Some(last) if last.continued_by(&r) => last.size += r.size,
                _ => joined.push(r),
            }
        }
        MemoryMap { regions: joined }
    }

    /// Every region, sorted by address space then GPA.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The regions of one address space, in GPA order.
    pub fn space(&self, address_space: u16) -> &[Region] {
        let lo = self
            .regions
            .partition_point(|r| r.address_space < address_space);
        let hi = self
            .regions
            .partition_point(|r| r.address_space <= address_space);
        &self.regions[lo..hi]
    }

    /// The address spaces that have at least one region, ascending.
    pub fn address_spaces(&self) -> Vec<u16> {
        let mut out: Vec<u16> = self.regions.iter().map(|r| r.address_space).collect();
        out.dedup();
        out
    }

    /// The region holding `gpa` in `address_space`.
    pub fn find(&self, address_space: u16, gpa: u64) -> Option<&Region> {
        let regions = self.space(address_space);
        let i = regions.partition_point(|r| r.end() <= gpa);
        regions.get(i).filter(|r| r.gpa <= gpa)
    }

    /// Number of regions (after joining).
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Bytes mapped, all address spaces.
    pub fn mapped_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }
}

#[cfg(all(test, feature = "serde"))]
mod tests {
    use super::*;

    const MAP: &str = r#"{
      "backings": { "ram": { "host": "0x7f0000000000", "size": "0x40000000" } },
      "regions": [
        { "gpa": "0x0", "size": "0xa0000", "backing": "ram", "name": "low ram" },
        { "gpa": "0xc0000", "size": "0x20000", "host": "0x7f1000000000", "readonly": true },
        { "gpa": 1048576, "size": "0x3ff00000", "backing": "ram", "offset": "0x100000",
          "log_dirty": true }
      ]
    }"#;

    #[test]
    fn parses_backings_hosts_and_flags() {
        let map = MemoryMap::from_json(MAP, "m.json").unwrap();
        assert_eq!(map.len(), 3);
        let r = map.regions();
        assert_eq!(r[0].host, 0x7f00_0000_0000);
        assert!(r[1].flags.readonly());
        assert_eq!(r[2].host, 0x7f00_0010_0000);
        assert!(r[2].flags.log_dirty());
        assert_eq!(map.find(0, 0xc1000).unwrap().gpa, 0xc0000);
        assert!(map.find(0, 0xa0000).is_none());
        let again = MemoryMap::from_json(&map.to_json(), "again").unwrap();
        assert_eq!(again, map);
    }

    #[test]
    fn overlap_names_both_regions() {
        let bad = MAP.replace("\"gpa\": \"0xc0000\"", "\"gpa\": \"0x9f000\"");
        match MemoryMap::from_json(&bad, "m.json") {
            Err(MapError::Overlap { at, other, gpa, .. }) => {
                assert_eq!(at, "regions[1]");
                assert_eq!(other, "regions[0] (low ram)");
                assert_eq!(gpa, 0x9f000);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn syntax_errors_give_line_and_column() {
        match MemoryMap::from_json("{\n  \"regions\": [ { \"gpa\": zz } ]\n}", "m.json") {
            Err(MapError::Json { line: 2, .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_regions_are_refused() {
        let one = |body: &str| MemoryMap::from_json(&format!("{{\"regions\":[{body}]}}"), "x");
        assert!(matches!(
            one(r#"{"gpa":"0x800","size":"0x1000","host":"0x1000"}"#),
            Err(MapError::Unaligned { what: "gpa", .. })
        ));
        assert!(matches!(
            one(r#"{"gpa":"0x0","size":"0","host":"0x1000"}"#),
            Err(MapError::Empty { .. })
        ));
        assert!(matches!(
            one(r#"{"gpa":"0x0","size":"0x1000"}"#),
            Err(MapError::HostOrBacking { .. })
        ));
        assert!(matches!(
            one(r#"{"gpa":"0x0","size":"0x1000","backing":"nope"}"#),
            Err(MapError::NoBacking { .. })
        ));
        assert!(one(r#"{"gpa":"0x0","size":"0x1000","host":"0x1000","color":1}"#).is_err());
    }

    #[test]
    fn numbers_out_of_range_say_so() {
        let one = |gpa: &str| {
            MemoryMap::from_json(
                &format!(
                    "{{\"regions\":[{{\"gpa\":{gpa},\"size\":\"0x1000\",\"host\":\"0x1000\"}}]}}"
                ),
                "x.json",
            )
            .unwrap_err()
            .to_string()
        };
        for (gpa, want) in [
            (
                "18446744073709551616",
                "not a whole number from 0 to 2^64 - 1",
            ),
            ("-4096", "-4096 is negative"),
            ("1.5", "not a whole number"),
            ("\"0x10000000000000000\"", "is too large for 64 bits"),
            ("\"12ab\"", "`12ab` is not a number"),
            ("true", "a number from 0 to 2^64 - 1"),
        ] {
            let msg = one(gpa);
            assert!(msg.starts_with("x.json:1:"), "{msg}");
            assert!(msg.contains(want), "{gpa}: {msg}");
            assert!(!msg.contains("untagged"), "{msg}");
        }
    }

    #[test]
    fn file_errors_print_once() {
        let dir = std::env::temp_dir().join(format!("memslots-map-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("b.json");
        let bad = MAP.replace("\"gpa\": \"0xc0000\"", "\"gpa\": \"0x9f000\"");
        std::fs::write(&path, bad).unwrap();
        let err = MemoryMap::from_file(&path).unwrap_err();
        // The whole chain, as the CLI prints it.
        let mut text = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        assert_eq!(
            text,
            format!(
                "{}: regions[1] overlaps regions[0] (low ram) in address space 0 at gpa 0x9f000",
                path.display()
            )
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn backing_bounds_are_checked() {
        let text = r#"{"backings":{"b":{"host":"0x10000","size":"0x2000"}},
            "regions":[{"gpa":"0x0","size":"0x2000","backing":"b","offset":"0x1000"}]}"#;
        assert!(matches!(
            MemoryMap::from_json(text, "x"),
            Err(MapError::OutsideBacking { .. })
        ));
    }
}
