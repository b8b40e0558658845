//! The `simulate` executor: waits for the task's estimated duration times a speed factor, then
//! succeeds or fails at random. For demos, tests and benchmarks: its results say they are
//! simulated, so that Switchyard learns no durations from them.

use std::time::Duration;

use super::Error;
use super::executor::Execution;
use crate::model::wire::TaskAssignment;

/// The error of a simulated failure.
pub const SIMULATED_FAILURE: &str = "simulated failure";

/// Sleeps `estimated_duration_secs × speed` (0 finishes at once), then fails with probability
/// `failure_rate`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Simulate {
    speed: f64,
    failure_rate: f64,
}

impl Default for Simulate {
    /// Real time, never failing.
    fn default() -> Self {
        Simulate { speed: 1.0, failure_rate: 0.0 }
    }
}

impl Simulate {
    /// `speed` is a finite factor of at least 0; `failure_rate` a probability in [0, 1].
    pub fn new(speed: f64, failure_rate: f64) -> Result<Self, Error> {
        if !speed.is_finite() || speed < 0.0 {
            return Err(Error::Invalid(format!("speed must be a finite number of at least 0, not {speed}")));
        }
        if !(0.0..=1.0).contains(&failure_rate) {
            return Err(Error::Invalid(format!("failure rate must be between 0 and 1, not {failure_rate}")));
        }
        Ok(Simulate { speed, failure_rate })
    }

    pub fn speed(&self) -> f64 {
        self.speed
    }

    pub fn failure_rate(&self) -> f64 {
        self.failure_rate
    }

    /// How long the task takes here.
    pub fn duration(&self, task: &TaskAssignment) -> Duration {
        let secs = f64::from(task.task.estimated_duration_secs) * self.speed;
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
    }

    pub async fn run(&self, task: &TaskAssignment) -> Execution {
        let duration = self.duration(task);
        if !duration.is_zero() {
            tokio::time::sleep(duration).await;
        }
        let output = format!("simulated {} in {} ms", task.task.key, duration.as_millis());
        // `random()` is in [0, 1): a rate of 0 never fails, a rate of 1 always does.
        if self.failure_rate > 0.0 && rand::random::<f64>() < self.failure_rate {
            Execution::failed(SIMULATED_FAILURE).with_output(output).simulated()
        } else {
            Execution::succeeded(output).simulated()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::tests::assignment;

    #[test]
    fn settings_are_checked() {
        assert!(Simulate::new(0.0, 0.0).is_ok());
        assert!(Simulate::new(2.5, 1.0).is_ok());
        for (speed, rate) in [(-1.0, 0.0), (f64::NAN, 0.0), (f64::INFINITY, 0.0), (1.0, 1.5), (1.0, -0.1)] {
            assert!(Simulate::new(speed, rate).is_err(), "{speed} {rate}");
        }
    }

    #[tokio::test]
    async fn speed_zero_is_immediate() {
        let task = assignment("1.deploy", "Deploy it", 3600);
        let started = std::time::Instant::now();
        let execution = Simulate::new(0.0, 0.0).unwrap().run(&task).await;
        assert!(started.elapsed() < Duration::from_millis(100));
        // Marked as simulated, so that no duration is learnt from it.
        assert_eq!(execution, Execution::succeeded("simulated 1.deploy in 0 ms").simulated());
    }

    #[tokio::test]
    async fn the_duration_scales_with_the_speed() {
        let task = assignment("1.deploy", "Deploy it", 2);
        let simulate = Simulate::new(0.1, 0.0).unwrap();
        assert_eq!(simulate.duration(&task), Duration::from_millis(200));
        assert_eq!(Simulate::new(30.0, 0.0).unwrap().duration(&task), Duration::from_secs(60));
        let started = std::time::Instant::now();
        let execution = simulate.run(&task).await;
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(200) && took < Duration::from_secs(2), "{took:?}");
        assert_eq!(execution.output, "simulated 1.deploy in 200 ms");
    }

    #[tokio::test]
    async fn failure_rate_one_always_fails_and_zero_never() {
        let task = assignment("1.deploy", "Deploy it", 10);
        let failing = Simulate::new(0.0, 1.0).unwrap();
        let passing = Simulate::new(0.0, 0.0).unwrap();
        for _ in 0..200 {
            let failed = failing.run(&task).await;
            assert!(!failed.success);
            assert_eq!(failed.error.as_deref(), Some(SIMULATED_FAILURE));
            let passed = passing.run(&task).await;
            assert!(passed.success && passed.error.is_none());
        }
    }
}
