//! The `memslots` command-line tool: each subcommand lives in a module of its own name.
//!
//! Exit status: 0 clean, 1 the run found a problem (a mismatch, a spurious exit), 2 bad input.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// Every module prints through these instead of std's macros of the same name (a macro_rules
// macro defined before the modules shadows the prelude's in all of them): std's panic when
// stdout is a closed pipe, and `memslots plan ... | head -1` must end quietly.
macro_rules! println {
    () => {
        $crate::output::print_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::output::print_line(format_args!($($arg)*))
    };
}

macro_rules! eprintln {
    () => {
        $crate::output::eprint_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::output::eprint_line(format_args!($($arg)*))
    };
}

mod bench;
mod boot;
mod conformance;
mod output;
mod plan;
mod replay;
mod stress;

/// Change a running VM's KVM memory slots atomically, and measure it.
#[derive(Parser, Debug)]
#[command(name = "memslots", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Hold the model against the running kernel (random calls) or a QEMU trace.
    Conformance(conformance::Args),
    /// Plan a QEMU trace's commits (or one change between two JSON maps) and compare with QEMU.
    Plan(plan::Args),
    /// Run a workload of layout changes on a real guest and count what it sees.
    Stress(stress::Args),
    /// Replay a QEMU trace's commits on a real guest.
    Replay(replay::Args),
    /// Measure slot-change costs, each beside a baseline run in turns with it.
    Bench(bench::Args),
    /// Boot SeaBIOS on N vCPUs on a small VMM whose PAM changes memslots applies.
    Boot(boot::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Conformance(args) => conformance::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Stress(args) => stress::run_cli(args),
        Command::Replay(args) => replay::run_cli(args),
        Command::Boot(args) => boot::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("memslots: {}", output::chain(&*err));
            ExitCode::from(2)
        }
    }
}
