//! The JSON form of a [`MemoryMap`] (feature `serde`): numbers as JSON integers or decimal or
//! `0x` hex strings, regions by host address or by named backing and offset.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::map::{MapError, MemoryMap, Region};
use crate::model::{SlotFlags, PAGE_SIZE};

impl MemoryMap {
    /// Parses the JSON form (see `docs/map-format.md`); `path` names the source in errors.
    pub fn from_json(text: &str, path: &str) -> Result<Self, MapError> {
        let file: MapFile = serde_json::from_str(text).map_err(|e| MapError::Json {
            path: path.to_owned(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?;
        file.resolve()
    }

    /// Reads a JSON map file.
    pub fn from_file(path: &Path) -> Result<Self, MapError> {
        let text = std::fs::read_to_string(path).map_err(|e| MapError::Io {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Self::from_json(&text, &path.display().to_string()).map_err(|e| match e {
            e @ (MapError::Json { .. } | MapError::Io { .. }) => e,
            other => MapError::InFile {
                path: path.to_owned(),
                inner: Box::new(other),
            },
        })
    }

    /// The JSON form: every region with its host address, numbers as hex strings.
    pub fn to_json(&self) -> String {
        let regions: Vec<RegionEntry> = self
            .regions()
            .iter()
            .map(|r| RegionEntry {
                address_space: r.address_space,
                gpa: Num(r.gpa),
                size: Num(r.size),
                host: Some(Num(r.host)),
                backing: None,
                offset: None,
                readonly: r.flags.readonly(),
                log_dirty: r.flags.log_dirty(),
                name: None,
            })
            .collect();
        let file = MapFile {
            backings: BTreeMap::new(),
            regions,
        };
        serde_json::to_string_pretty(&file).expect("a map always serializes")
    }
}

/// A number in JSON: an integer, or a string in decimal or `0x` hex.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Num(u64);

impl Serialize for Num {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:#x}", self.0))
    }
}

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor rather than an untagged enum: the enum's only error was "data did not match
        // any variant", which named neither the value nor what is wrong with it.
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Num;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a number from 0 to 2^64 - 1 (a JSON integer, or a decimal or 0x hex string)",
                )
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Num, E> {
                Ok(Num(v))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Num, E> {
                u64::try_from(v).map(Num).map_err(|_| {
                    E::custom(format!("{v} is negative; numbers here are 0 to 2^64 - 1"))
                })
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Num, E> {
                // serde_json hands integers past u64 over as floats.
                Err(E::custom(format!(
                    "{v} is not a whole number from 0 to 2^64 - 1 (too large, or not an integer)"
                )))
            }

            fn visit_str<E: serde::de::Error>(self, t: &str) -> Result<Num, E> {
                let t = t.replace('_', "");
                let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => t.parse(),
                };
                parsed.map(Num).map_err(|e| {
                    let why = match e.kind() {
                        std::num::IntErrorKind::PosOverflow => "is too large for 64 bits",
                        _ => "is not a number (decimal or 0x hex)",
                    };
                    E::custom(format!("`{t}` {why}"))
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackingEntry {
    host: Num,
    size: Num,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegionEntry {
    #[serde(default)]
    address_space: u16,
    gpa: Num,
    size: Num,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host: Option<Num>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backing: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    offset: Option<Num>,
    #[serde(default)]
    readonly: bool,
    #[serde(default)]
    log_dirty: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MapFile {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    backings: BTreeMap<String, BackingEntry>,
    regions: Vec<RegionEntry>,
}

impl MapFile {
    fn resolve(self) -> Result<MemoryMap, MapError> {
        let label = |i: usize, e: &RegionEntry| match &e.name {
            Some(n) => format!("regions[{i}] ({n})"),
            None => format!("regions[{i}]"),
        };
        for (name, b) in &self.backings {
            let at = || format!("backings.{name}");
            if b.host.0 % PAGE_SIZE != 0 {
                return Err(MapError::Unaligned {
                    at: at(),
                    what: "host address",
                    value: b.host.0,
                });
            }
            if b.host.0.checked_add(b.size.0).is_none() {
                return Err(MapError::Wraps { at: at() });
            }
        }
        let mut regions = Vec::with_capacity(self.regions.len());
        for (i, e) in self.regions.iter().enumerate() {
            let at = || label(i, e);
            let host = match (&e.host, &e.backing) {
                (Some(h), None) if e.offset.is_none() => h.0,
                (None, Some(name)) => {
                    let b = self.backings.get(name).ok_or_else(|| MapError::NoBacking {
                        at: at(),
                        name: name.clone(),
                    })?;
                    let offset = e.offset.map_or(0, |o| o.0);
                    if offset
                        .checked_add(e.size.0)
                        .is_none_or(|end| end > b.size.0)
                    {
                        return Err(MapError::OutsideBacking {
                            at: at(),
                            name: name.clone(),
                            offset,
                            size: e.size.0,
                            backing_size: b.size.0,
                        });
                    }
                    b.host.0 + offset
                }
                _ => return Err(MapError::HostOrBacking { at: at() }),
            };
            let flags = SlotFlags::NONE
                .with(SlotFlags::READONLY, e.readonly)
                .with(SlotFlags::LOG_DIRTY_PAGES, e.log_dirty);
            regions.push(Region {
                address_space: e.address_space,
                gpa: e.gpa.0,
                size: e.size.0,
                host,
                flags,
            });
        }
        MemoryMap::with_names(regions, |i| label(i, &self.regions[i]))
    }
}
