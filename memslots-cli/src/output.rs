//! Output helpers shared by the subcommands: error chains and the JSON last line.

use std::error::Error;
use std::io::Write;

use serde::Serialize;

pub use memslots_testkit::error_chain as chain;

/// Prints `value` as one line of JSON on stdout (the last line, which tools read).
///
/// Written as it is serialized, not built as a string first: a long trace's plan is megabytes of
/// JSON. Write errors end the process as [`print_line`]'s do.
pub fn json_line<T: Serialize>(value: &T) -> Result<(), Box<dyn Error>> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if let Err(e) = serde_json::to_writer(&mut out, value) {
        if !e.is_io() {
            return Err(e.into());
        }
        write_failed(&e.into());
    }
    if let Err(e) = out.write_all(b"\n").and_then(|()| out.flush()) {
        write_failed(&e);
    }
    Ok(())
}

/// Ends the process after stdout failed: quietly (status 0) when the reader closed the pipe, with
/// the cause on stderr (status 2) otherwise.
fn write_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    let _ = writeln!(std::io::stderr(), "memslots: cannot write to stdout: {e}");
    std::process::exit(2);
}

/// Writes one line to stdout; what the crate's `println!` expands to.
///
/// std's `println!` panics when stdout is gone. A reader that closed the pipe
/// (`memslots plan ... | head -1`) has all it wanted, so the process ends quietly with status 0;
/// any other write error ends it with the cause on stderr and status 2.
pub fn print_line(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let result = out.write_fmt(args).and_then(|()| out.write_all(b"\n"));
    if let Err(e) = result {
        write_failed(&e);
    }
}

/// Writes one line to stderr; what the crate's `eprintln!` expands to. A closed stderr is ignored
/// (there is nowhere left to say anything) rather than a panic.
pub fn eprint_line(args: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| err.write_all(b"\n"));
}

/// A progress bar on stderr, shown only when stderr is a terminal (never in pipes or CI logs).
pub struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    /// A bar of `total` steps (a spinner when unknown), labelled `message`.
    pub fn new(total: Option<u64>, message: String) -> Self {
        use std::io::IsTerminal;
        Progress(std::io::stderr().is_terminal().then(|| {
            let bar = match total {
                Some(n) => indicatif::ProgressBar::new(n),
                None => indicatif::ProgressBar::new_spinner(),
            };
            bar.set_message(message);
            bar
        }))
    }

    /// `done` steps of `total` (when the total becomes known on the way).
    pub fn set(&self, done: u64, total: Option<u64>) {
        if let Some(bar) = &self.0 {
            if let Some(t) = total {
                bar.set_length(t);
            }
            bar.set_position(done);
        }
    }

    /// Removes the bar before the summary is printed.
    pub fn finish(self) {
        if let Some(bar) = self.0 {
            bar.finish_and_clear();
        }
    }
}
