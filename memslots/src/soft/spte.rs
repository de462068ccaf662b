//! The SPTE model: a shared cache of guest page -> host page entries, as the MMU's shadow/TDP page
//! tables hold them. Readers fill it on a miss (a fault); the writer zaps it as KVM would.
//!
//! Entries are only ever installed from inside a read-side critical section, from the slot the
//! reader found there; the writer zaps only after a grace period that follows the publish of the
//! change. So a zap can never be undone by a fault that raced with it (KVM gets the same from
//! `mmu_invalidate_seq` and the `mmu_lock`; here the per-space lock stands for `mmu_lock`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::model::PAGE_SIZE;

/// One cached translation of a guest page.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Spte {
    /// Host address of the page.
    pub host_page: u64,
    /// Whether guest writes go straight through (false: write-protected).
    pub writable: bool,
}

/// Counters of the SPTE model and the read side.
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct SpteCounters {
    /// Misses that went to the memslots (a page fault).
    pub faults: u64,
    /// Entries zapped or write-protected by the writer.
    pub zapped: u64,
    /// Lookups that landed in an invalid slot and must be retried.
    pub retries: u64,
}

/// The shared SPTE cache of one VM, one map per address space.
#[derive(Debug)]
pub struct SpteCache {
    spaces: Vec<Mutex<BTreeMap<u64, Spte>>>,
    faults: AtomicU64,
    zapped: AtomicU64,
    retries: AtomicU64,
}

impl SpteCache {
    /// An empty cache for `address_spaces` spaces.
    pub fn new(address_spaces: u16) -> Self {
        SpteCache {
            spaces: (0..address_spaces)
                .map(|_| Mutex::new(BTreeMap::new()))
                .collect(),
            faults: AtomicU64::new(0),
            zapped: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        }
    }

    fn space(&self, address_space: u16) -> Option<MutexGuard<'_, BTreeMap<u64, Spte>>> {
        let m = self.spaces.get(usize::from(address_space))?;
        Some(m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The entry for the page holding `gpa`.
    pub fn get(&self, address_space: u16, gpa: u64) -> Option<Spte> {
        self.space(address_space)?.get(&(gpa / PAGE_SIZE)).copied()
    }

    /// Installs an entry (a fault's result).
    pub(crate) fn install(&self, address_space: u16, gpa: u64, spte: Spte) {
        if let Some(mut map) = self.space(address_space) {
            map.insert(gpa / PAGE_SIZE, spte);
        }
    }

    pub(crate) fn count_fault(&self) {
        self.faults.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Removes every entry of `[start, end)`; returns how many there were.
    pub(crate) fn zap(&self, address_space: u16, start: u64, end: u64) -> u64 {
        let Some(mut map) = self.space(address_space) else {
            return 0;
        };
        let (first, last) = (start / PAGE_SIZE, end.div_ceil(PAGE_SIZE));
        let pages: Vec<u64> = map.range(first..last).map(|(&k, _)| k).collect();
        for page in &pages {
            map.remove(page);
        }
        let n = pages.len() as u64;
        self.zapped.fetch_add(n, Ordering::Relaxed);
        n
    }

    /// Write-protects every writable entry of `[start, end)`; returns how many there were.
    pub(crate) fn write_protect(&self, address_space: u16, start: u64, end: u64) -> u64 {
        let Some(mut map) = self.space(address_space) else {
            return 0;
        };
        let (first, last) = (start / PAGE_SIZE, end.div_ceil(PAGE_SIZE));
        let mut n = 0;
        for (_, spte) in map.range_mut(first..last) {
            if spte.writable {
                spte.writable = false;
                n += 1;
            }
        }
        self.zapped.fetch_add(n, Ordering::Relaxed);
        n
    }

    /// Drops every entry without counting a zap; returns how many there were.
    pub(crate) fn clear(&self) -> u64 {
        (0..self.spaces.len() as u16)
            .filter_map(|s| self.space(s))
            .map(|mut m| std::mem::take(&mut *m).len() as u64)
            .sum()
    }

    /// Number of entries, all spaces.
    pub fn len(&self) -> usize {
        (0..self.spaces.len() as u16)
            .filter_map(|s| self.space(s).map(|m| m.len()))
            .sum()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The counters so far.
    pub fn counters(&self) -> SpteCounters {
        SpteCounters {
            faults: self.faults.load(Ordering::Relaxed),
            zapped: self.zapped.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
        }
    }
}
