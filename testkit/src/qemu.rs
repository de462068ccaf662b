//! QEMU 8.0's memory listener, as the stress and replay engines reproduce it: its calls for a
//! layout change, and its rule for holding the vCPUs out.

use memslots::model::{Applied, Change, Layout, Slot, SlotCall};

/// QEMU 8.0's rule: a commit holds every vCPU out when a range it removes (DELETE, or a MOVE's old
/// range) overlaps one it adds (CREATE, or a MOVE's new range). `done` is the commit's calls as
/// the model applied them.
pub fn inhibits(done: &[Applied]) -> bool {
    let mut removed = Vec::new();
    let mut added = Vec::new();
    for a in done {
        if a.change.zaps() {
            removed.extend(a.before);
        }
        if matches!(a.change, Change::Create | Change::Move) {
            added.extend(a.after);
        }
    }
    removed.iter().any(|r| {
        added
            .iter()
            .any(|n| r.id.address_space == n.id.address_space && r.gpa < n.end() && n.gpa < r.end())
    })
}

/// [`inhibits`] for `calls` applied to `before`; false for calls the model refuses.
pub fn inhibits_calls(before: &Layout, calls: &[SlotCall]) -> bool {
    let mut scratch = before.clone();
    scratch.check_batch(calls).is_ok_and(|done| inhibits(&done))
}

/// QEMU's listener: every slot that changed is deleted, then every new one created; a slot whose
/// only change is dirty logging is re-issued in place.
pub fn batch(before: &Layout, after: &Layout) -> Vec<SlotCall> {
    let same_but_logging = |a: &Slot, b: &Slot| {
        a.gpa == b.gpa
            && a.size == b.size
            && a.host == b.host
            && a.flags.readonly() == b.flags.readonly()
    };
    let mut deletes = Vec::new();
    let mut flags = Vec::new();
    let mut creates = Vec::new();
    for old in before.slots() {
        match after.slot(old.id) {
            Some(new) if new == old => {}
            Some(new) if same_but_logging(old, new) => flags.push(new.set_call()),
            _ => deletes.push(old.delete_call()),
        }
    }
    for new in after.slots() {
        match before.slot(new.id) {
            Some(old) if old == new || same_but_logging(old, new) => {}
            _ => creates.push(new.set_call()),
        }
    }
    deletes.into_iter().chain(flags).chain(creates).collect()
}
