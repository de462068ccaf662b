//! SVG drawings of the guest physical map before and after each commit, with the plan's calls.
//!
//! GPA space spans 4 KiB pages to terabytes, so the axis is not linear: every edge of a region
//! or call in the commit is a tick, and each interval between ticks gets a width that grows with
//! the logarithm of its size. Ticks are labelled with their GPA.

use std::fmt::Write;

use memslots::model::Change;
use memslots::planner::MemoryMap;
use memslots::planner::Plan;

/// One commit to draw.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    /// A heading (for example "commit 3, trace lines 8-16").
    pub title: &'a str,
    /// The mapping before the commit.
    pub before: &'a MemoryMap,
    /// The mapping after it.
    pub after: &'a MemoryMap,
    /// The calls that take one to the other.
    pub plan: &'a Plan,
}

const WIDTH: f64 = 1200.0;
const LEFT: f64 = 70.0;
const BAR: f64 = 22.0;
const FRAME_HEIGHT: f64 = 215.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn short(gpa: u64) -> String {
    format!("{gpa:#x}")
}

/// Draws every frame, one under the other, as a standalone SVG document.
pub fn render(frames: &[Frame<'_>]) -> String {
    let rows: usize = frames
        .iter()
        .map(|f| spaces(f).len().max(1))
        .sum::<usize>()
        .max(1);
    let height = 64.0 + rows as f64 * FRAME_HEIGHT;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="monospace" font-size="11">"#
    );
    let _ = writeln!(
        out,
        r##"<rect width="100%" height="100%" fill="white"/>
<text x="10" y="16" font-size="12">Guest physical map before and after each commit (axis: every edge is a tick; widths grow with log2 of size).</text>
<text x="10" y="30" font-size="12">Bars: RAM (green), read-only (blue), dirty logging (orange edge), unmapped (grey).</text>
<text x="10" y="44" font-size="12">Calls below: delete (red), create (green), move (purple), flags (orange); quiesced calls have a black edge.</text>"##
    );
    let mut y = 64.0;
    for f in frames {
        for space in spaces(f) {
            draw_frame(&mut out, f, space, y);
            y += FRAME_HEIGHT;
        }
        if spaces(f).is_empty() {
            let _ = writeln!(
                out,
                r#"<text x="10" y="{}">{} (nothing mapped)</text>"#,
                y + 14.0,
                esc(f.title)
            );
            y += FRAME_HEIGHT;
        }
    }
    out.push_str("</svg>\n");
    out
}

fn spaces(f: &Frame<'_>) -> Vec<u16> {
    let mut s = f.before.address_spaces();
    s.extend(f.after.address_spaces());
    s.extend(f.plan.calls.iter().map(|c| c.call.id().address_space));
    s.sort_unstable();
    s.dedup();
    s
}

fn draw_frame(out: &mut String, f: &Frame<'_>, space: u16, y: f64) {
    let mut ticks: Vec<u64> = Vec::new();
    for map in [f.before, f.after] {
        for r in map.space(space) {
            ticks.extend([r.gpa, r.end()]);
        }
    }
    for c in f
        .plan
        .calls
        .iter()
        .filter(|c| c.call.id().address_space == space)
    {
        let size = if c.call.is_delete() {
            c.zapped_bytes.max(0x1000)
        } else {
            c.call.size
        };
        ticks.extend([c.call.gpa, c.call.gpa + size]);
    }
    ticks.sort_unstable();
    ticks.dedup();
    if ticks.len() < 2 {
        return;
    }
    // Interval widths grow with log2 of their size.
    let weights: Vec<f64> = ticks
        .windows(2)
        .map(|w| 1.0 + ((w[1] - w[0]) as f64).log2().max(12.0) - 12.0)
        .collect();
    let total: f64 = weights.iter().sum();
    let span = WIDTH - LEFT - 70.0;
    let mut xs = vec![LEFT];
    for w in &weights {
        let last = *xs.last().expect("xs starts non-empty");
        xs.push(last + w / total * span);
    }
    let x_of = |gpa: u64| -> f64 {
        let i = ticks.partition_point(|&t| t < gpa);
        xs[i.min(xs.len() - 1)]
    };
    let _ = writeln!(
        out,
        r#"<text x="10" y="{}" font-size="12" font-weight="bold">{} (address space {space}): {} calls, {} quiesced, {} bytes zapped</text>"#,
        y + 4.0,
        esc(f.title),
        f.plan.ioctls(),
        f.plan.quiesced_ioctls(),
        f.plan.zapped_bytes()
    );
    for (label, map, top) in [("before", f.before, y + 14.0), ("after", f.after, y + 44.0)] {
        let _ = writeln!(
            out,
            r##"<text x="10" y="{}">{label}</text><rect x="{LEFT}" y="{top}" width="{span}" height="{BAR}" fill="#e6e6e6"/>"##,
            top + 15.0
        );
        for r in map.space(space) {
            let (x0, x1) = (x_of(r.gpa), x_of(r.end()));
            let fill = if r.flags.readonly() {
                "#7aa6e0"
            } else {
                "#8fd18f"
            };
            let stroke = if r.flags.log_dirty() {
                r##"stroke="#f08c00" stroke-width="3""##
            } else {
                r##"stroke="#555" stroke-width="0.5""##
            };
            let _ = writeln!(
                out,
                r#"<rect x="{x0:.1}" y="{top}" width="{:.1}" height="{BAR}" fill="{fill}" {stroke}><title>{}</title></rect>"#,
                (x1 - x0).max(0.5),
                esc(&r.to_string())
            );
        }
    }
    // Calls, one lane each so that overlapping ones stay visible.
    let calls: Vec<_> = f
        .plan
        .calls
        .iter()
        .filter(|c| c.call.id().address_space == space)
        .collect();
    let lanes = 6usize;
    for (i, c) in calls.iter().enumerate() {
        let size = if c.call.is_delete() {
            c.zapped_bytes.max(0x1000)
        } else {
            c.call.size
        };
        let (x0, x1) = (x_of(c.call.gpa), x_of(c.call.gpa + size));
        let top = y + 74.0 + (i % lanes) as f64 * 9.0;
        let fill = match c.change {
            Change::Delete => "#e03131",
            Change::Create => "#2f9e44",
            Change::Move => "#9c36b5",
            Change::FlagsOnly | Change::Unchanged => "#f08c00",
        };
        let stroke = if c.quiesced {
            r#"stroke="black" stroke-width="1.5""#
        } else {
            r#"stroke="none""#
        };
        let _ = writeln!(
            out,
            r#"<rect x="{x0:.1}" y="{top}" width="{:.1}" height="7" fill="{fill}" {stroke}><title>{} {}{}</title></rect>"#,
            (x1 - x0).max(1.0),
            c.change,
            esc(&c.call.to_string()),
            if c.quiesced { " (quiesced)" } else { "" }
        );
    }
    // Tick labels, thinned so they do not overlap.
    let mut last_x = f64::NEG_INFINITY;
    for (t, x) in ticks.iter().zip(&xs) {
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" stroke="#999" stroke-width="0.5"/>"##,
            y + 12.0,
            y + 130.0
        );
        if x - last_x >= 13.0 {
            let ty = y + 134.0;
            let _ = writeln!(
                out,
                r#"<text x="{x:.1}" y="{ty}" transform="rotate(60 {x:.1} {ty})">{}</text>"#,
                short(*t)
            );
            last_x = *x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memslots::model::{Layout, Limits, SlotFlags};
    use memslots::planner::{plan, Region};

    #[test]
    fn draws_both_maps_and_every_call() {
        let ram = |gpa, size| Region {
            address_space: 0,
            gpa,
            size,
            host: 0x7f00_0000_0000 + gpa,
            flags: SlotFlags::NONE,
        };
        let before = MemoryMap::new(vec![ram(0, 0x4000_0000)]).unwrap();
        let after = MemoryMap::new(vec![ram(0, 0xa_0000), ram(0xc_0000, 0x3ff4_0000)]).unwrap();
        let mut layout = Layout::new(Limits::default());
        let boot = plan(&layout, &before).unwrap();
        layout.apply_batch(&boot.slot_calls()).unwrap();
        let p = plan(&layout, &after).unwrap();
        let svg = render(&[Frame {
            title: "vga <window>",
            before: &before,
            after: &after,
            plan: &p,
        }]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("vga &lt;window&gt;"));
        assert_eq!(svg.matches("<title>DELETE").count(), 1);
        assert!(svg.contains(">0xa0000<"));
        // One rect per region (1 before + 2 after) plus the two background bars and the page.
        assert_eq!(svg.matches("<rect").count(), 3 + 2 + 1 + p.ioctls());
    }
}
