//! Progress bars for the long phases (connecting thousands of clients, timed runs).
//!
//! indicatif draws only when stderr is a terminal, so CI logs and redirected runs stay
//! clean without a flag; `--quiet` hides them on a terminal too.

use indicatif::{ProgressBar, ProgressStyle};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static QUIET: AtomicBool = AtomicBool::new(false);

/// Hides every bar created afterwards.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// A counting bar (`len` steps) labelled `msg`.
pub fn bar(len: u64, msg: impl Into<String>) -> ProgressBar {
    if QUIET.load(Ordering::Relaxed) {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    // The template is a literal checked by the tests below, so a bad one cannot ship.
    if let Ok(style) = ProgressStyle::with_template(
        "{msg:>28} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta})",
    ) {
        pb.set_style(style);
    }
    pb.set_message(msg.into());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// A bar that fills over a fixed duration (timed runs); the caller sets the position in
/// seconds.
pub fn timed(secs: u64, msg: impl Into<String>) -> ProgressBar {
    bar(secs, msg)
}

/// Prints a line above any active bar (or plainly when there is none).
pub fn note(msg: impl AsRef<str>) {
    eprintln!("{}", msg.as_ref());
}

#[cfg(test)]
mod tests {
    #[test]
    fn template_parses() {
        assert!(
            indicatif::ProgressStyle::with_template(
                "{msg:>28} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta})"
            )
            .is_ok()
        );
    }
}
