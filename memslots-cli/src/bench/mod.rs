//! `memslots bench`: every figure beside a baseline measured in turns with it, in one process.

mod harness;
mod ioctl;
mod machine;

use std::error::Error;
use std::process::ExitCode;

use serde::Serialize;

use crate::output::json_line;
use harness::Figure;
use machine::Machine;

/// Arguments of `memslots bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Fewer rounds: under a minute.
    #[arg(long)]
    quick: bool,
    /// Print the results as JSON on the last line of stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Results {
    machine: Machine,
    results: Vec<Figure>,
}

/// Runs the subcommand.
pub fn run(args: Args) -> Result<ExitCode, Box<dyn Error>> {
    let machine = Machine::read();
    println!(
        "machine: {} | kernel {} | {} cores",
        machine.cpu, machine.kernel, machine.cores
    );
    let mut results = Vec::new();
    results.extend(ioctl::run(args.quick).map_err(|e| format!("raw ioctl costs: {e}"))?);
    println!(
        "{:<36} {:>12} {:>6}  {:<36} {:>12} {:>8}",
        "figure", "median", "unit", "baseline", "median", "ratio"
    );
    for f in &results {
        println!(
            "{:<36} {:>12.2} {:>6}  {:<36} {:>12.2} {:>8.2}",
            f.name, f.value, f.unit, f.baseline_name, f.baseline_value, f.ratio
        );
    }
    if args.json {
        json_line(&Results { machine, results })?;
    }
    Ok(ExitCode::SUCCESS)
}
