//! Shared by the soft backend's tests: a small PRNG and a family of layouts with every kind of
//! change between them (grow/shrink, split/merge around an overlay, ROM/RAM flips, a moving BAR,
//! dirty logging on/off).
#![allow(dead_code)]

use memslots::model::{Batch, Layout, Limits, Slot, SlotCall, SlotFlags, SlotId, PAGE_SIZE};

/// xorshift64*: deterministic, seedable, allocation-free.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub const RAM_HOST: u64 = 0x7f00_0000_0000;
pub const ROM_HOST: u64 = 0x7f10_0000_0000;
pub const RESIZE_HOST: u64 = 0x7f20_0000_0000;
pub const BAR_HOST: u64 = 0x7f30_0000_0000;
pub const SCRATCH_HOST: u64 = 0x7f40_0000_0000;
/// GPA page where a scratch slot lives only inside batches (never published).
pub const SCRATCH_PAGE: u64 = 480;
/// Pages of guest-physical space the states use.
pub const WINDOW_PAGES: u64 = 512;

fn slot(id: u16, page: u64, pages: u64, host: u64, flags: SlotFlags) -> Slot {
    Slot {
        id: SlotId::new(id),
        gpa: page * PAGE_SIZE,
        size: pages * PAGE_SIZE,
        host,
        flags,
        guest_memfd: 0,
        guest_memfd_offset: 0,
    }
}

/// One state of the family.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct State {
    /// 0: one RAM slot; 1: ROM overlay (other host) between two RAM pieces; 2: RAM piece turned
    /// read-only in place (same host) between two RAM pieces.
    pub shadow: u8,
    /// Resizable region: 16, 32 or 48 pages.
    pub resize: u8,
    /// Dirty logging on the resizable region.
    pub dirty: bool,
    /// BAR: absent, at page 256, at page 320.
    pub bar: u8,
}

impl State {
    pub fn all() -> Vec<State> {
        let mut out = Vec::new();
        for shadow in 0..3 {
            for resize in 0..3 {
                for dirty in [false, true] {
                    for bar in 0..3 {
                        out.push(State {
                            shadow,
                            resize,
                            dirty,
                            bar,
                        });
                    }
                }
            }
        }
        out
    }

    pub fn slots(&self) -> Vec<Slot> {
        let mut out = Vec::new();
        match self.shadow {
            0 => out.push(slot(0, 0, 64, RAM_HOST, SlotFlags::NONE)),
            s => {
                out.push(slot(0, 0, 32, RAM_HOST, SlotFlags::NONE));
                let host = if s == 1 {
                    ROM_HOST
                } else {
                    RAM_HOST + 32 * PAGE_SIZE
                };
                out.push(slot(1, 32, 8, host, SlotFlags::READONLY));
                out.push(slot(2, 40, 24, RAM_HOST + 40 * PAGE_SIZE, SlotFlags::NONE));
            }
        }
        let flags = if self.dirty {
            SlotFlags::LOG_DIRTY_PAGES
        } else {
            SlotFlags::NONE
        };
        out.push(slot(
            3,
            128,
            16 * (1 + u64::from(self.resize)),
            RESIZE_HOST,
            flags,
        ));
        match self.bar {
            0 => {}
            b => out.push(slot(
                4,
                192 + 64 * u64::from(b),
                8,
                BAR_HOST,
                SlotFlags::NONE,
            )),
        }
        out
    }

    pub fn layout(&self) -> Layout {
        let mut layout = Layout::new(Limits::default());
        for s in self.slots() {
            layout.apply(&s.set_call()).expect("valid state");
        }
        layout
    }
}

/// A valid batch from `from` to `to`: deletes, then moves and flag changes, then creates; with
/// `rng`, sometimes an UNCHANGED call, and a scratch slot created and deleted inside the batch.
pub fn transition(from: &Layout, to: &Layout, rng: &mut Rng) -> Batch {
    let mut deletes = Vec::new();
    let mut middle = Vec::new();
    let mut creates = Vec::new();
    for s in from.slots() {
        match to.slot(s.id) {
            Some(t) if t == s => {}
            Some(t)
                if t.size == s.size
                    && t.host == s.host
                    && t.flags.readonly() == s.flags.readonly()
                    && (t.gpa == s.gpa || t.flags == s.flags) =>
            {
                middle.push(t.set_call()) // MOVE or FLAGS_ONLY
            }
            _ => deletes.push(s.delete_call()),
        }
    }
    for t in to.slots() {
        let keep = from.slot(t.id).is_some_and(|s| {
            s.size == t.size
                && s.host == t.host
                && s.flags.readonly() == t.flags.readonly()
                && (t.gpa == s.gpa || t.flags == s.flags)
        });
        if !keep {
            creates.push(t.set_call());
        }
    }
    let mut calls: Vec<SlotCall> = Vec::new();
    if rng.below(4) == 0 {
        if let Some(s) = from.slots().next() {
            calls.push(s.set_call()); // UNCHANGED
        }
    }
    calls.extend(deletes);
    if rng.below(4) == 0 {
        let scratch = slot(9, SCRATCH_PAGE, 8, SCRATCH_HOST, SlotFlags::NONE);
        calls.push(scratch.set_call());
        calls.push(scratch.delete_call());
    }
    calls.extend(middle);
    calls.extend(creates);
    Batch::from(calls)
}

/// A batch the model refuses at its last call, after a valid prefix that deletes and moves.
pub fn refused(from: &Layout, to: &Layout, rng: &mut Rng) -> Batch {
    let mut calls = transition(from, to, rng).calls().to_vec();
    let first = *from.slots().next().expect("states are not empty");
    // A second slot over the first one's range: EEXIST.
    calls.push(
        Slot {
            id: SlotId::new(7),
            ..first
        }
        .set_call(),
    );
    Batch::from(calls)
}
