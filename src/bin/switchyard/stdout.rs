//! Standard output for a command whose reader may go away: `switchyard list | head -1` is done
//! once `head` has its line, and the command ends then, quietly, with 0.

use std::fmt;
use std::io::{self, Write};

/// Writes to standard output; a closed pipe ends the process with 0, any other failure to write
/// with 2 and the reason.
pub fn write(args: fmt::Arguments<'_>) {
    let mut out = io::stdout().lock();
    if let Err(err) = out.write_fmt(args) {
        if err.kind() == io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        // Standard error may be gone too: nothing more to say then.
        let _ = writeln!(io::stderr(), "error: cannot write to standard output: {err}");
        std::process::exit(2);
    }
}
