//! Output helpers shared by the subcommands: error chains and the JSON last line.

use std::error::Error;

use serde::Serialize;

/// An error and its causes, joined with ": ".
pub fn chain(err: &(dyn Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

/// Prints `value` as one line of JSON on stdout (the last line, which tools read).
pub fn json_line<T: Serialize>(value: &T) -> Result<(), Box<dyn Error>> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}
