//! Raw slot ioctl cost on this kernel: create, delete, move and flags-only with 10, 509 and 32,764
//! slots present. Each op at n slots is measured in turns with the same op at 10 slots; at 10 slots
//! the baseline is a null ioctl (`KVM_CHECK_EXTENSION`), the syscall floor.

use std::error::Error;
use std::time::Instant;

use kvm_ioctls::Cap;
use memslots::kvm::Vm;
use memslots::model::{Slot, SlotFlags, SlotId, PAGE_SIZE};

use super::harness::{interleave, median, Figure, Mode};

/// A VM holding `n` one-page slots, and a spare slot the ops work on.
struct Filled {
    // Declared before `pool`: the VM (and its slots) must go before the memory behind them.
    vm: Vm,
    spare: Slot,
    log: bool,
    moved: bool,
    exists: bool,
    _pool: vm_memory::MmapRegion<()>,
}

impl Filled {
    fn new(n: u16) -> Result<Self, Box<dyn Error>> {
        let pool = vm_memory::MmapRegion::<()>::new((usize::from(n) + 1) * PAGE_SIZE as usize)?;
        let vm = Vm::new()?;
        let base = pool.as_ptr() as u64;
        for id in 0..n {
            let slot = Slot {
                id: SlotId::new(id),
                gpa: u64::from(id) * 2 * PAGE_SIZE,
                size: PAGE_SIZE,
                host: base + u64::from(id) * PAGE_SIZE,
                flags: SlotFlags::NONE,
                guest_memfd: 0,
                guest_memfd_offset: 0,
            };
            // SAFETY: `pool` lives as long as `vm` (see the field order of `Filled`); no vCPU runs.
            unsafe { vm.set_region(&slot.set_call()) }
                .map_err(|e| format!("creating slot {id} of {n}: errno {e}"))?;
        }
        let spare = Slot {
            id: SlotId::new(n),
            gpa: 1 << 40,
            size: PAGE_SIZE,
            host: base + u64::from(n) * PAGE_SIZE,
            flags: SlotFlags::NONE,
            guest_memfd: 0,
            guest_memfd_offset: 0,
        };
        Ok(Filled {
            vm,
            spare,
            log: false,
            moved: false,
            exists: false,
            _pool: pool,
        })
    }

    fn call(&self, slot: &Slot, delete: bool) -> f64 {
        let call = if delete {
            slot.delete_call()
        } else {
            slot.set_call()
        };
        let t = Instant::now();
        // SAFETY: the spare slot's page is in the pool, which outlives the VM.
        let r = unsafe { self.vm.set_region(&call) };
        let us = t.elapsed().as_secs_f64() * 1e6;
        assert!(r.is_ok(), "slot call refused: {call} errno {r:?}");
        us
    }

    fn current(&self) -> Slot {
        Slot {
            gpa: if self.moved {
                self.spare.gpa + 4 * PAGE_SIZE
            } else {
                self.spare.gpa
            },
            flags: if self.log {
                SlotFlags::LOG_DIRTY_PAGES
            } else {
                SlotFlags::NONE
            },
            ..self.spare
        }
    }

    fn ensure(&mut self, exists: bool) {
        if self.exists != exists {
            let s = self.current();
            self.call(&s, !exists);
            self.exists = exists;
        }
    }

    fn op(&mut self, op: Op) -> f64 {
        match op {
            Op::Create => {
                self.ensure(false);
                let s = self.current();
                self.exists = true;
                self.call(&s, false)
            }
            Op::Delete => {
                self.ensure(true);
                let s = self.current();
                self.exists = false;
                self.call(&s, true)
            }
            Op::Move => {
                self.ensure(true);
                self.moved = !self.moved;
                let s = self.current();
                self.call(&s, false)
            }
            Op::FlagsOnly => {
                self.ensure(true);
                self.log = !self.log;
                let s = self.current();
                self.call(&s, false)
            }
            Op::Null => {
                let t = Instant::now();
                std::hint::black_box(self.vm.fd().check_extension(Cap::NrMemslots));
                t.elapsed().as_secs_f64() * 1e6
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Create,
    Delete,
    Move,
    FlagsOnly,
    Null,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Delete => "delete",
            Op::Move => "move",
            Op::FlagsOnly => "flags_only",
            Op::Null => "null_ioctl",
        }
    }
}

/// Measures every op at every size against its baseline.
///
/// Every op at every size is measured in the same loop, round by round, rather than one op after
/// the other: on this host all slot calls turn several times slower for seconds at a time, and a
/// figure measured in one stretch would show whichever state that stretch fell in.
pub fn run(mode: Mode) -> Result<Vec<Figure>, Box<dyn Error>> {
    let rounds = mode.pick(5, 200, 2000);
    let ops = [Op::Create, Op::Delete, Op::Move, Op::FlagsOnly];
    let mut small = Filled::new(10)?;
    let mut null = Filled::new(0)?;
    // n filler slots plus the spare: 510 and 32,764 slots while the op runs.
    let mut big: Vec<(u32, Filled)> = Vec::new();
    for n in [509u16, 32_763] {
        let shown = if n == 32_763 { 32_764 } else { u32::from(n) };
        big.push((shown, Filled::new(n)?));
    }
    // samples[op][0]: 10 slots vs the null ioctl; samples[op][1 + i]: big[i] vs 10 slots.
    let mut samples: Vec<Vec<(Vec<f64>, Vec<f64>)>> = ops
        .iter()
        .map(|_| (0..=big.len()).map(|_| (Vec::new(), Vec::new())).collect())
        .collect();
    for _ in 0..rounds {
        for (o, &op) in ops.iter().enumerate() {
            let (a, b) = interleave(1, || small.op(op), || null.op(Op::Null));
            samples[o][0].0.extend(a);
            samples[o][0].1.extend(b);
            for (i, (_, filled)) in big.iter_mut().enumerate() {
                let (a, b) = interleave(1, || filled.op(op), || small.op(op));
                samples[o][1 + i].0.extend(a);
                samples[o][1 + i].1.extend(b);
            }
        }
    }
    let mut out = Vec::new();
    for (i, size) in std::iter::once(10)
        .chain(big.iter().map(|b| b.0))
        .enumerate()
    {
        for (o, op) in ops.iter().enumerate() {
            let (a, b) = &mut samples[o][i];
            let base = if i == 0 {
                "null_ioctl".to_owned()
            } else {
                format!("ioctl_{}_10", op.name())
            };
            out.push(Figure::new(
                format!("ioctl_{}_{size}", op.name()),
                "us",
                median(a),
                base,
                median(b),
            ));
        }
    }
    Ok(out)
}
