//! Backoff, the one way Switchyard waits before trying again: exponential, with jitter, through
//! `backon`. [`exponential`] bounds the attempts of one operation (a publish, a call to a model,
//! a connection); [`Pauses`] paces a process that tries again for as long as it runs (a worker
//! or an agent whose broker or database is away).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Waits from `first` to at most `longest`, doubling, with jitter, for `attempts` attempts in
/// all (so `attempts - 1` waits; none for 0 or 1).
pub fn exponential(first: Duration, longest: Duration, attempts: usize) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(first)
        .with_max_delay(longest)
        .with_max_times(attempts.saturating_sub(1))
        .with_jitter()
}

/// The pauses between the attempts of a process that never gives up: from half a second,
/// doubling, never longer than the longest pause, with jitter; [`Pauses::reset`] starts again from
/// the shortest once things went well for a while.
#[derive(Debug)]
pub struct Pauses {
    builder: ExponentialBuilder,
    pauses: ExponentialBackoff,
}

impl Pauses {
    /// The first pause is half a second to a second.
    pub const FIRST: Duration = Duration::from_millis(500);

    pub fn new(longest: Duration) -> Self {
        // Jitter adds up to the delay itself: capped at half the longest, a pause never passes it.
        let builder = ExponentialBuilder::default()
            .with_min_delay(Self::FIRST)
            .with_max_delay((longest / 2).max(Self::FIRST))
            .without_max_times()
            .with_jitter();
        Pauses { builder, pauses: builder.build() }
    }

    /// The pause before the next attempt.
    pub fn next_pause(&mut self) -> Duration {
        self.pauses.next().unwrap_or(Self::FIRST)
    }

    /// Starts again from the shortest pause.
    pub fn reset(&mut self) {
        self.pauses = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_the_longest_and_start_again_after_a_reset() {
        let longest = Duration::from_secs(4);
        let mut pauses = Pauses::new(longest);
        let first = pauses.next_pause();
        // Jitter adds up to the pause itself, never takes away.
        assert!(first >= Pauses::FIRST && first <= 2 * Pauses::FIRST, "{first:?}");
        let later: Vec<Duration> = (0..10).map(|_| pauses.next_pause()).collect();
        assert!(later.iter().all(|p| *p <= longest), "never longer than the longest: {later:?}");
        assert!(later.last().unwrap() >= &(longest / 2), "it grows to the longest: {later:?}");
        pauses.reset();
        assert!(pauses.next_pause() <= 2 * Pauses::FIRST);
    }

    #[test]
    fn attempts_count_the_first_try() {
        let waits: Vec<Duration> =
            exponential(Duration::from_millis(10), Duration::from_millis(40), 4).build().collect();
        assert_eq!(waits.len(), 3);
        assert!(exponential(Duration::from_millis(10), Duration::from_secs(1), 0).build().next().is_none());
        assert!(exponential(Duration::from_millis(10), Duration::from_secs(1), 1).build().next().is_none());
    }
}
