//! Writes a generated QEMU trace ([`memslots_testkit::samples::SyntheticTrace`]) to stdout, to
//! time `memslots plan` and `memslots replay` on a trace as large as needed:
//!
//!     cargo run --release -p memslots-testkit --example synthetic_trace -- 50000 2000 1 > big.log

use std::io::Write;
use std::process::ExitCode;

use memslots_testkit::samples::SyntheticTrace;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [commits, slots, seed] => commits
            .parse()
            .ok()
            .zip(slots.parse().ok())
            .zip(seed.parse().ok())
            .map(|((commits, slots), seed)| SyntheticTrace {
                commits,
                slots,
                seed,
            }),
        _ => None,
    };
    let Some(trace) = parsed else {
        eprintln!("usage: synthetic_trace COMMITS SLOTS SEED  (SLOTS at most 65535)");
        return ExitCode::from(2);
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match trace.write_to(&mut out).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("synthetic_trace: {e}");
            ExitCode::from(1)
        }
    }
}
