//! Graceful shutdown for the long-running commands, `worker` and `agent`: the first signal lets
//! them finish what they hold, a second one ends them at once.

use tokio_util::sync::CancellationToken;

/// The exit status after a second signal: the shell's for a process ended by SIGINT.
const EXIT_INTERRUPTED: i32 = 130;

/// On the first SIGTERM or SIGINT (Ctrl-C), cancels `shutdown`: the process stops taking work,
/// finishes what it holds and exits 0. On a second one it exits at once, with
/// [`EXIT_INTERRUPTED`]: what it had not acknowledged goes back to its queues when the broker sees
/// the connection drop.
pub fn stop_on_signals(shutdown: CancellationToken, finishing: &'static str) {
    // Listening from now on, not from the first signal: a second one that came meanwhile counts.
    let mut signals = match Signals::new() {
        Ok(signals) => signals,
        Err(err) => {
            tracing::error!(error = %err, "cannot listen for signals; stop the process with SIGKILL");
            return;
        }
    };
    tokio::spawn(async move {
        signals.next().await;
        tracing::info!("shutting down: {finishing} (a second signal exits at once)");
        shutdown.cancel();
        signals.next().await;
        tracing::warn!("second signal: exiting now; unacknowledged messages go back to their queues");
        std::process::exit(EXIT_INTERRUPTED);
    });
}

/// SIGTERM and SIGINT, as they come.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals {
                term: signal(SignalKind::terminate())?,
                interrupt: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.interrupt.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
