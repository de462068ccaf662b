//! Where the planner cuts new slots, so that likely future changes delete small slots, not big ones.

/// How new slots are cut.
///
/// KVM cannot resize, split or re-flag a slot's READONLY bit in place: changing any part of a slot
/// deletes it, and KVM zaps every mapping of a deleted slot. So a new slot should not span a range
/// that is likely to change on its own (firmware shadowing its ROMs, the VGA window, option ROMs),
/// while cutting too finely costs ioctls now and for every later flag change. The default is
/// x86's PC layout: legacy boundaries below 1 MiB, and unaligned edges of big runs cut off at
/// 2 MiB boundaries so the body keeps huge pages and a change at a ragged edge deletes only the
/// edge. Finer size-aligned power-of-two blocks inside a range (`fine_range`) are available, but
/// on the committed QEMU traces cutting the ROM area into 64 KiB or 128 KiB blocks cost more
/// quiesced calls and ioctls than it saved, so the default does not.
#[derive(Clone, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct CutPolicy {
    /// GPAs a new slot never spans (sorted ascending): edges of ranges that change on their own.
    pub boundaries: Vec<u64>,
    /// `[start, end)` where new slots are further cut into size-aligned power-of-two blocks.
    pub fine_range: (u64, u64),
    /// Largest block inside `fine_range` (a power of two; 0 for no fine cutting).
    pub fine_block: u64,
    /// A new slot longer than `4 * huge_page` has its unaligned head and tail cut off at
    /// `huge_page` boundaries (0 to never do this).
    pub huge_page: u64,
    /// Slot ids per address space left unused by policy cuts: when the cuts would leave fewer
    /// free, the planner cuts new slots only where the mapping itself requires it.
    pub headroom: u16,
    /// Host addresses a new slot never spans, whatever the budget: where one
    /// registered host memory ends and another begins, which a backend keeps apart (a slot of
    /// the kvm backend's `SlotUpdater` lies in one registered memory) though the map joins them
    /// when they continue each other in GPA too.
    #[cfg_attr(feature = "serde", serde(default))]
    pub host_boundaries: Vec<u64>,
}

impl CutPolicy {
    /// No cut beyond what the mapping requires: one slot per run of contiguous host memory.
    pub fn minimal() -> Self {
        CutPolicy {
            boundaries: Vec::new(),
            fine_range: (0, 0),
            fine_block: 0,
            huge_page: 0,
            headroom: 0,
            host_boundaries: Vec::new(),
        }
    }

    /// This policy, minimal: no cut beyond what the mapping and the host boundaries require.
    pub fn minimal_within(&self) -> Self {
        CutPolicy {
            host_boundaries: self.host_boundaries.clone(),
            ..CutPolicy::minimal()
        }
    }

    /// This policy with `edges` as its host boundaries (the kvm backend's
    /// `SlotUpdater::host_edges` gives those of its registered memory).
    pub fn with_host_boundaries(mut self, edges: impl IntoIterator<Item = u64>) -> Self {
        self.host_boundaries = edges.into_iter().collect();
        self.host_boundaries.sort_unstable();
        self.host_boundaries.dedup();
        self
    }

    /// x86 PC: 0xa0000 (end of conventional memory, VGA window), 0xc0000 (expansion ROMs and
    /// BIOS area, which firmware shadows through PAM), 0x100000 (end of the BIOS area).
    pub fn x86_pc() -> Self {
        CutPolicy {
            boundaries: vec![0xa_0000, 0xc_0000, 0x10_0000],
            fine_range: (0xc_0000, 0x10_0000),
            fine_block: 0,
            huge_page: 0x20_0000,
            headroom: 4096,
            host_boundaries: Vec::new(),
        }
    }

    /// Cut points strictly inside `[start, end)`, ascending, for a range whose first byte is at
    /// host address `host`.
    pub(crate) fn cuts(&self, start: u64, end: u64, host: u64, out: &mut Vec<u64>) {
        // Filtered rather than searched: a policy built by hand may not keep them sorted, and a
        // wrong cut only costs a slot where a missing one gets the plan refused.
        out.extend(
            self.host_boundaries
                .iter()
                .filter_map(|&b| b.checked_sub(host))
                .filter(|&offset| offset > 0 && offset < end - start)
                .map(|offset| start + offset),
        );
        let first = self.boundaries.partition_point(|&b| b <= start);
        out.extend(
            self.boundaries[first..]
                .iter()
                .copied()
                .take_while(|&b| b < end),
        );
        let (fs, fe) = (start.max(self.fine_range.0), end.min(self.fine_range.1));
        if self.fine_block.is_power_of_two() && fs < fe {
            let mut at = fs;
            while at < fe {
                if at > start {
                    out.push(at);
                }
                at += aligned_block(at, fe, self.fine_block);
            }
            if fe < end {
                out.push(fe);
            }
        }
        // KVM maps a GPA range with huge pages only where the host range is aligned the same way
        // (GPA and host address congruent modulo the huge page size); elsewhere the cut buys
        // nothing and only costs slots.
        let congruent = self.huge_page.is_power_of_two()
            && start.wrapping_sub(host) & (self.huge_page - 1) == 0;
        if congruent && end - start > 4 * self.huge_page {
            let head = start.next_multiple_of(self.huge_page);
            let tail = end / self.huge_page * self.huge_page;
            if head > start && head < end {
                out.push(head);
            }
            if tail > start && tail < end {
                out.push(tail);
            }
        }
        out.sort_unstable();
        out.dedup();
    }
}

impl Default for CutPolicy {
    fn default() -> Self {
        CutPolicy::x86_pc()
    }
}

/// The largest power-of-two block at `at`, aligned to its size, ending by `end`, at most `cap`.
pub(crate) fn aligned_block(at: u64, end: u64, cap: u64) -> u64 {
    let align = if at == 0 {
        cap
    } else {
        1u64 << at.trailing_zeros().min(63)
    };
    let room = end - at;
    let fit = 1u64 << (63 - room.leading_zeros());
    align.min(cap).min(fit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x86_cuts_below_one_mib() {
        let mut p = CutPolicy::x86_pc();
        let mut out = Vec::new();
        p.cuts(0, 0x2000_0000, 0x7f00_0000_0000, &mut out);
        assert_eq!(out, vec![0xa_0000, 0xc_0000, 0x10_0000]);
        p.fine_block = 0x1_0000;
        out.clear();
        p.cuts(0, 0x2000_0000, 0x7f00_0000_0000, &mut out);
        assert_eq!(
            out,
            vec![0xa_0000, 0xc_0000, 0xd_0000, 0xe_0000, 0xf_0000, 0x10_0000]
        );
        out.clear();
        p.cuts(0xca000, 0xd8000, 0x7f00_000c_a000, &mut out);
        // 0xca000: 8 KiB block, then 0xcc000: 16 KiB, 0xd0000: 32 KiB.
        assert_eq!(out, vec![0xcc000, 0xd0000]);
        out.clear();
        p.cuts(
            0x10_0000 + 0x1000,
            0x1_0000_0000 - 0x1000,
            0x7f00_0010_1000,
            &mut out,
        );
        assert_eq!(out, vec![0x20_0000, 0xffe0_0000]);
    }

    #[test]
    fn huge_page_cuts_only_where_host_and_guest_are_congruent() {
        let p = CutPolicy {
            boundaries: Vec::new(),
            ..CutPolicy::x86_pc()
        };
        let (start, end) = (0x10_1000, 0x4000_0000 - 0x1000);
        let mut out = Vec::new();
        // Host congruent to the GPA modulo 2 MiB: the ragged ends are cut off.
        p.cuts(start, end, 0x7f00_0010_1000, &mut out);
        assert_eq!(out, vec![0x20_0000, 0x3fe0_0000]);
        // Host 4 KiB off: KVM gives the range no huge page anyway, so no cut.
        for host in [0x7f00_0010_2000, 0x7f00_0000_0000, 0x7f00_0011_1000] {
            out.clear();
            p.cuts(start, end, host, &mut out);
            assert!(out.is_empty(), "host {host:#x}: {out:x?}");
        }
    }

    #[test]
    fn host_boundaries_cut_in_every_policy() {
        let edges = [0x7f00_0010_0000, 0x7f00_0030_0000, 0x7f00_0100_0000];
        for base in [CutPolicy::minimal(), CutPolicy::x86_pc()] {
            let p = base.with_host_boundaries(edges.iter().rev().copied());
            assert_eq!(p.host_boundaries, edges);
            for p in [p.clone(), p.minimal_within()] {
                let mut out = Vec::new();
                // GPA 0x40_0000.. at host 0x7f00_0000_0000..: the first two edges fall inside
                // (the third is exactly the end), and no other cut at these GPAs.
                p.cuts(0x40_0000, 0x140_0000, 0x7f00_0000_0000, &mut out);
                assert_eq!(out, vec![0x50_0000, 0x70_0000], "{p:?}");
                // A range starting on an edge is not cut there.
                out.clear();
                p.cuts(0x40_0000, 0x50_0000, 0x7f00_0010_0000, &mut out);
                assert!(out.is_empty(), "{out:x?}");
            }
        }
        // Built by hand, unsorted: the same cuts, no panic.
        let p = CutPolicy {
            host_boundaries: edges.iter().rev().copied().collect(),
            ..CutPolicy::minimal()
        };
        let mut out = Vec::new();
        p.cuts(0x40_0000, 0x140_0000, 0x7f00_0000_0000, &mut out);
        assert_eq!(out, vec![0x50_0000, 0x70_0000]);
    }

    #[test]
    fn blocks_are_aligned_powers_of_two() {
        for (at, end, cap, want) in [
            (0, 0x10_0000, 0x1_0000, 0x1_0000),
            (0xc_a000, 0xd_0000, 0x1_0000, 0x2000),
            (0xc_0000, 0xc_3000, 0x1_0000, 0x2000),
        ] {
            assert_eq!(aligned_block(at, end, cap), want);
        }
    }
}
