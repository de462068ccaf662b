//! The i440fx as the VMM's memory-map owner: PCI config writes to PAM or SMRAM become a new map,
//! described to memslots' [`Listener`] as sections removed and added, planned, and applied with
//! the run's strategy *on the thread that handled the write* (a vCPU thread), while the other
//! vCPUs stay in `KVM_RUN`. Every map the guest could have seen is kept, so an MMIO exit can be
//! judged against all of them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use memslots::kvm::{Backing, SlotUpdater};
use memslots::model::SlotFlags;
use memslots::planner::{CutPolicy, Listener, Section};

use crate::strategy::{self, Strategy};

use super::pam::{self, Piece, Source};
use super::pci::PciHost;

/// The VMM's three memories, registered with the updater.
#[derive(Debug)]
pub(crate) struct Memory {
    pub ram: Arc<Backing>,
    pub bios: Arc<Backing>,
    pub rom: Arc<Backing>,
}

impl Memory {
    fn backing(&self, source: Source) -> &Backing {
        match source {
            Source::Ram => &self.ram,
            Source::Bios => &self.bios,
            Source::Rom => &self.rom,
        }
    }

    /// Which memory a host address lies in, and the offset in it.
    pub fn name_of(&self, host: u64) -> Option<(String, u64)> {
        [Source::Ram, Source::Bios, Source::Rom]
            .into_iter()
            .map(|s| (s, self.backing(s)))
            .find(|(_, b)| b.holds(host, 1))
            .map(|(s, b)| (s.name().to_owned(), host - b.host()))
    }
}

/// One applied memory-map change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitRecord {
    /// The vCPU whose exit carried the write.
    pub vcpu: usize,
    /// The OS thread that applied it.
    pub tid: i32,
    /// The PAM registers after the write.
    pub pam: [u8; 7],
    /// Slot ioctls made.
    pub ioctls: u64,
    /// Of those, made with the vCPUs held out.
    pub quiesced_ioctls: u64,
    /// How long vCPUs were held out (0 when nobody was).
    pub blackout: Duration,
    /// Of that, from the kick to every other vCPU out of `KVM_RUN`.
    pub kick_to_parked: Duration,
    /// Wall time of the apply.
    pub update: Duration,
}

/// What an MMIO exit at a guest address was, given every map the vCPU could have seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// Every such map had memory there (writable, for a write): the vCPU saw a half-applied map.
    Spurious,
    /// A write to memory some such map made read-only: dropped, as ROM drops writes.
    RomWrite,
    /// No map has anything there: unassigned, reads all ones.
    Unassigned,
    /// Mapped in some of them only: a legitimate exit during a change.
    InFlight,
}

/// The host bridge, the listener and the updater, behind one lock.
#[derive(Debug)]
pub(crate) struct Chipset {
    pci: PciHost,
    listener: Listener,
    updater: SlotUpdater,
    strategy: Strategy,
    memory: Memory,
    ram_size: u64,
    bios_size: u64,
    sections: Vec<Section>,
    /// The map after each commit; `[0]` is the machine at reset.
    history: Vec<Vec<Piece>>,
    /// Index into `history` of the last complete map, read by vCPUs before each entry.
    generation: Arc<AtomicUsize>,
    pub pam_writes: u64,
    pub smram_writes: u64,
    pub commits: Vec<CommitRecord>,
    pub init_ioctls: u64,
    /// A commit that failed (the boot cannot go on).
    pub failure: Option<String>,
}

/// The slot call's flags for a piece.
fn flags(p: &Piece) -> SlotFlags {
    if p.readonly {
        SlotFlags::READONLY
    } else {
        SlotFlags::NONE
    }
}

impl Chipset {
    /// The chipset at reset, its map planned and applied (no vCPU exists yet).
    pub fn new(
        updater: SlotUpdater,
        strategy: Strategy,
        memory: Memory,
        generation: Arc<AtomicUsize>,
    ) -> Result<Self, String> {
        let limits = *updater.layout().limits();
        let mut chipset = Chipset {
            pci: PciHost::new(),
            // No slot may span two registered memories, though mmap may place them back to back.
            listener: Listener::with_policy(
                limits,
                CutPolicy::default().with_host_boundaries(updater.host_edges()),
            ),
            ram_size: memory.ram.size(),
            bios_size: memory.bios.size(),
            updater,
            strategy,
            memory,
            sections: Vec::new(),
            history: Vec::new(),
            generation,
            pam_writes: 0,
            smram_writes: 0,
            commits: Vec::new(),
            init_ioctls: 0,
            failure: None,
        };
        let map = chipset.map();
        let calls = chipset
            .transaction(&map)
            .map_err(|e| format!("planning reset: {e}"))?;
        chipset
            .updater
            .apply(&calls)
            .map_err(|e| format!("mapping reset: {}", super::chain(&e)))?;
        chipset.history.push(map);
        chipset.init_ioctls = chipset.updater.ioctls();
        Ok(chipset)
    }

    /// The map the registers select now.
    fn map(&self) -> Vec<Piece> {
        pam::memory_map(
            &self.pci.pam(),
            self.pci.smram(),
            self.ram_size,
            self.bios_size,
        )
    }

    fn sections_of(&self, map: &[Piece]) -> Vec<Section> {
        map.iter()
            .map(|p| Section {
                address_space: 0,
                gpa: p.gpa,
                size: p.size,
                host: self.memory.backing(p.source).host() + p.offset,
                flags: flags(p),
            })
            .collect()
    }

    /// Tells the listener what changed (removed sections, then added ones) and commits: the
    /// planner's calls.
    fn transaction(
        &mut self,
        map: &[Piece],
    ) -> Result<Vec<memslots::model::SlotCall>, memslots::planner::ListenerError> {
        let new = self.sections_of(map);
        self.listener.begin()?;
        for s in self.sections.iter().filter(|s| !new.contains(s)) {
            self.listener.region_del(*s)?;
        }
        for s in new.iter().filter(|s| !self.sections.contains(s)) {
            self.listener.region_add(*s)?;
        }
        let plan = self.listener.commit()?;
        self.sections = new;
        Ok(plan.slot_calls())
    }

    /// A port read at 0xcf8-0xcff.
    pub fn io_read(&self, port: u16, data: &mut [u8]) {
        self.pci.read(port, data);
    }

    /// A port write at 0xcf8-0xcff by vCPU `vcpu`, on its thread; a PAM or SMRAM write is
    /// committed and applied before this returns (before the vCPU runs on).
    pub fn io_write(&mut self, vcpu: usize, port: u16, data: &[u8]) {
        let touched = self.pci.write(port, data);
        self.pam_writes += u64::from(touched.pam);
        self.smram_writes += u64::from(touched.smram);
        if (touched.pam || touched.smram) && self.failure.is_none() {
            if let Err(e) = self.commit(vcpu) {
                self.failure = Some(format!("vCPU {vcpu}: {e}"));
            }
        }
    }

    fn commit(&mut self, vcpu: usize) -> Result<(), String> {
        let map = self.map();
        let calls = self.transaction(&map).map_err(|e| e.to_string())?;
        if calls.is_empty() {
            // Nothing the guest can see changed (SMRAM without VGA, or the same PAM values).
            return Ok(());
        }
        let tid = super::gettid();
        let stats = strategy::apply(&mut self.updater, &calls, self.strategy)
            .map_err(|e| format!("applying {} calls: {}", calls.len(), super::chain(&e)))?;
        self.commits.push(CommitRecord {
            vcpu,
            tid,
            pam: self.pci.pam(),
            ioctls: stats.ioctls,
            quiesced_ioctls: stats.quiesced_ioctls,
            blackout: stats.quiesce.map_or(Duration::ZERO, |q| q.blackout),
            kick_to_parked: stats.quiesce.map_or(Duration::ZERO, |q| q.kick_to_parked),
            update: stats.update,
        });
        self.history.push(map);
        self.generation
            .store(self.history.len() - 1, Ordering::SeqCst);
        Ok(())
    }

    /// Judges an MMIO exit at `gpa` by a vCPU that entered `KVM_RUN` when map `seen` was the
    /// last complete one.
    pub fn judge(&self, seen: usize, gpa: u64, write: bool) -> Access {
        judge(&self.history, seen, gpa, write)
    }

    /// The slot calls' layout now.
    pub fn updater(&self) -> &SlotUpdater {
        &self.updater
    }

    /// The PAM registers now.
    pub fn pam(&self) -> [u8; 7] {
        self.pci.pam()
    }

    /// The three memories.
    pub fn memory(&self) -> &Memory {
        &self.memory
    }
}

/// Judges an MMIO exit at `gpa` against `history[seen..]`, every map a vCPU that entered
/// `KVM_RUN` when map `seen` was the last complete one could have seen (the maps of commits made
/// since, up to now: the caller holds the chipset, so none is in flight).
pub(crate) fn judge(history: &[Vec<Piece>], seen: usize, gpa: u64, write: bool) -> Access {
    let maps = &history[seen.min(history.len().saturating_sub(1))..];
    let hits: Vec<Option<&Piece>> = maps.iter().map(|m| pam::lookup(m, gpa)).collect();
    if hits
        .iter()
        .all(|p| p.is_some_and(|p| !write || !p.readonly))
    {
        Access::Spurious
    } else if write && hits.iter().any(|p| p.is_some_and(|p| p.readonly)) {
        Access::RomWrite
    } else if hits.iter().all(Option::is_none) {
        Access::Unassigned
    } else {
        Access::InFlight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_is_spurious_only_where_every_visible_map_had_memory() {
        let (ram, bios) = (512 << 20, 128 << 10);
        let reset = pam::memory_map(&[0; 7], 0x02, ram, bios);
        let writable =
            pam::memory_map(&[0x30, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33], 0x02, ram, bios);
        let readonly =
            pam::memory_map(&[0x10, 0x11, 0x11, 0x11, 0x11, 0x11, 0x31], 0x02, ram, bios);
        let history = vec![reset, writable, readonly];
        // A fetch at 0xf0000: memory in every map since any entry.
        for seen in 0..3 {
            assert_eq!(judge(&history, seen, 0xf_d1ee, false), Access::Spurious);
        }
        // A write there: read-only in the reset map and after the last commit, writable between.
        assert_eq!(judge(&history, 0, 0xf_0000, true), Access::RomWrite);
        assert_eq!(judge(&history, 2, 0xf_0000, true), Access::RomWrite);
        assert_eq!(
            judge(&history, 1, 0xe_c000, true),
            Access::Spurious,
            "mode 3 throughout"
        );
        // Nothing mapped: the IOAPIC's page, the PCI hole.
        assert_eq!(judge(&history, 0, 0xfec0_0000, false), Access::Unassigned);
        assert_eq!(judge(&history, 0, ram, true), Access::Unassigned);
    }
}
