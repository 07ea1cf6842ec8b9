//! What the `tapestry-sim` and `tapestry-lab` commands share about their
//! command lines: `--help` and `--version` print and succeed, and a bad
//! command line is one line naming the problem, with exit code 2.

use std::process::ExitCode;

/// Parses this process's arguments into `C`, or says why not and gives the
/// exit code to return: success after `--help` and `--version`, 2 after one
/// line on standard error, `PROGRAM: PROBLEM (see HELP)` (`HELP` being the
/// command that shows the rest of clap's message).
pub fn parse_args<C: clap::Parser>(program: &str, help: &str) -> Result<C, ExitCode> {
    C::try_parse().map_err(|e| {
        if !e.use_stderr() {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        let text = e.to_string();
        let first = text
            .lines()
            .next()
            .unwrap_or("invalid arguments")
            .trim_start_matches("error: ");
        eprintln!("{program}: {first} (see {help})");
        ExitCode::from(2)
    })
}
