//! The `exec` executor: runs the command configured for the task's work type.
//!
//! The command is a program and its arguments, started directly, never through a shell, and the
//! task reaches it only as JSON on standard input: nothing in a task's text can become a command
//! line, however it is quoted. Exit code 0 is success. Standard output, up to
//! [`MAX_RESULT_OUTPUT_BYTES`], is the result's output; the end of standard error explains a
//! failure.
//!
//! The command starts in a process group of its own (on Unix). A command that outlives the
//! timeout is killed with everything it started in that group, and so is a command whose run is
//! dropped (the agent aborted the task). A command that exits on its own is done: what it left
//! running in the background is its business, and its output is read only for a moment
//! ([`OUTPUT_DRAIN`]) after it exited, so that a background process holding its standard output
//! open neither holds up the result nor loses it.
//!
//! Its environment is not the agent's: only [`PASSED_ENV`] and the task's `SWITCHYARD_TASK_ID`,
//! `SWITCHYARD_WORK_TYPE` and `SWITCHYARD_ATTEMPT`. The agent's own settings (its broker URL with
//! its credentials, say) never reach a task's command.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::Error;
use super::executor::{Execution, truncate_utf8};
use crate::model::ids::WorkType;
use crate::model::wire::{MAX_RESULT_OUTPUT_BYTES, TaskAssignment};

/// How much of the end of standard error a failure reports.
pub const STDERR_TAIL_BYTES: usize = 8 * 1024;

/// The agent's environment variables that a command gets (those the agent has); everything else
/// is withheld.
pub const PASSED_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER"];

/// How long the output of a command that exited is still read: enough for what is left in the
/// pipes, and a bound when a background process it left holds them open.
pub const OUTPUT_DRAIN: Duration = Duration::from_millis(250);

/// A program and its arguments. No shell is involved: `args` reach the program as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecCommand {
    pub program: String,
    pub args: Vec<String>,
}

impl ExecCommand {
    pub fn new(program: impl Into<String>, args: impl IntoIterator<Item = impl Into<String>>) -> Self {
        ExecCommand { program: program.into(), args: args.into_iter().map(Into::into).collect() }
    }

    /// From `[program, args…]`; `None` when empty.
    pub fn from_argv(argv: impl IntoIterator<Item = String>) -> Option<Self> {
        let mut argv = argv.into_iter();
        let program = argv.next().filter(|p| !p.is_empty())?;
        Some(ExecCommand { program, args: argv.collect() })
    }
}

/// The `--exec-config` file:
///
/// ```toml
/// timeout_secs = 600
/// [commands]
/// deployment = ["/usr/local/bin/deploy", "--verbose"]
/// code_generation = ["python3", "/opt/agents/codegen.py"]
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    /// Seconds a command may run before it is killed.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Work type → `[program, args…]`.
    #[serde(default)]
    pub commands: BTreeMap<WorkType, Vec<String>>,
}

impl ExecConfig {
    pub fn parse(text: &str) -> Result<Self, Error> {
        toml::from_str(text).map_err(|e| Error::Invalid(format!("exec configuration: {e}")))
    }

    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Invalid(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
    }
}

/// Runs the command configured for each work type, with a timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exec {
    commands: BTreeMap<WorkType, ExecCommand>,
    timeout: Duration,
}

impl Exec {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

    /// No command yet, and `timeout` for each one.
    pub fn new(timeout: Duration) -> Self {
        Exec { commands: BTreeMap::new(), timeout }
    }

    /// Runs `command` for tasks of `work_type` (replacing any earlier one).
    pub fn command(mut self, work_type: WorkType, command: ExecCommand) -> Self {
        self.commands.insert(work_type, command);
        self
    }

    /// From a configuration file's contents; its timeout, else the default.
    pub fn from_config(config: ExecConfig) -> Result<Self, Error> {
        let timeout = config.timeout_secs.map_or(Self::DEFAULT_TIMEOUT, Duration::from_secs);
        let mut exec = Exec::new(timeout);
        for (work_type, argv) in config.commands {
            let command = ExecCommand::from_argv(argv)
                .ok_or_else(|| Error::Invalid(format!("the command for work type {work_type} is empty")))?;
            exec = exec.command(work_type, command);
        }
        Ok(exec)
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn commands(&self) -> &BTreeMap<WorkType, ExecCommand> {
        &self.commands
    }

    pub async fn run(&self, task: &TaskAssignment) -> Execution {
        let work_type = &task.task.work_type;
        let Some(command) = self.commands.get(work_type) else {
            return Execution::failed(format!("no command configured for work type {work_type}"));
        };
        let input = serde_json::to_vec(task).expect("a task assignment serializes");
        let mut process = tokio::process::Command::new(&command.program);
        process.args(&command.args).env_clear();
        for name in PASSED_ENV {
            if let Some(value) = std::env::var_os(name) {
                process.env(name, value);
            }
        }
        process
            .env("SWITCHYARD_TASK_ID", task.task.id.to_string())
            .env("SWITCHYARD_WORK_TYPE", work_type.as_str())
            .env("SWITCHYARD_ATTEMPT", task.attempt.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        #[cfg(unix)]
        process.process_group(0);
        let mut child = match process.spawn() {
            Ok(child) => child,
            Err(err) => return Execution::failed(format!("cannot start {}: {err}", command.program)),
        };
        // From here on, a dropped run kills the command and all it started.
        let mut group = ProcessGroup::of(&child);
        let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let write_input = async move {
            if let Some(mut stdin) = stdin {
                // A command that does not read its input closes the pipe: that is its business.
                let _ = stdin.write_all(&input).await;
                let _ = stdin.shutdown().await;
                // Dropped here: the command sees the end of its input.
            }
        };
        // Kept outside the readers, so that what they read survives when they are given up.
        let (mut stdout_kept, mut stderr_kept) = (Vec::new(), Vec::new());
        let status = {
            let io = async {
                tokio::join!(
                    write_input,
                    read_head(stdout, MAX_RESULT_OUTPUT_BYTES, &mut stdout_kept),
                    read_tail(stderr, STDERR_TAIL_BYTES, &mut stderr_kept),
                )
            };
            tokio::pin!(io);
            let mut io_done = false;
            let deadline = tokio::time::sleep(self.timeout);
            tokio::pin!(deadline);
            let exited = loop {
                tokio::select! {
                    status = child.wait() => break Some(status),
                    _ = &mut io, if !io_done => io_done = true,
                    () = &mut deadline => break None,
                }
            };
            let Some(status) = exited else {
                group.kill();
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Execution::failed(format!("timed out after {}", seconds(self.timeout)));
            };
            // The command is gone: nothing is left to kill on its behalf.
            group.disarm();
            if !io_done {
                let _ = tokio::time::timeout(OUTPUT_DRAIN, &mut io).await;
            }
            status
        };
        let status = match status {
            Ok(status) => status,
            Err(err) => return Execution::failed(format!("cannot wait for {}: {err}", command.program)),
        };
        let output =
            truncate_utf8(String::from_utf8_lossy(&stdout_kept).into_owned(), MAX_RESULT_OUTPUT_BYTES);
        if status.success() {
            return Execution::succeeded(output);
        }
        let how = match status.code() {
            Some(code) => format!("exit code {code}"),
            None => status.to_string(),
        };
        let stderr = String::from_utf8_lossy(tail(&stderr_kept, STDERR_TAIL_BYTES));
        let stderr = stderr.trim();
        let error = if stderr.is_empty() { how } else { format!("{how}: {stderr}") };
        Execution::failed(error).with_output(output)
    }
}

/// The process group of a command started with `process_group(0)`, whose id is the command's
/// process id. Dropped while armed, it kills the whole group: the command and whatever it
/// started that did not leave the group.
struct ProcessGroup {
    #[cfg(unix)]
    id: Option<libc::pid_t>,
}

impl ProcessGroup {
    fn of(child: &tokio::process::Child) -> Self {
        #[cfg(unix)]
        {
            ProcessGroup { id: child.id().and_then(|id| libc::pid_t::try_from(id).ok()) }
        }
        #[cfg(not(unix))]
        {
            let _ = child;
            ProcessGroup {}
        }
    }

    /// Kills every process in the group (SIGKILL), once.
    fn kill(&mut self) {
        #[cfg(unix)]
        if let Some(id) = self.id.take() {
            // SAFETY: killpg has no memory-safety preconditions. The group still exists: its
            // leader, the command, has not been waited for yet (`disarm` is called once it has).
            unsafe {
                libc::killpg(id, libc::SIGKILL);
            }
        }
    }

    /// The command exited and was waited for: the group is no longer ours to kill.
    fn disarm(&mut self) {
        #[cfg(unix)]
        {
            self.id = None;
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `5s`, or `1.5s`.
fn seconds(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}s", duration.as_secs_f64())
    }
}

/// Reads to the end into `kept`, keeping the first `limit` bytes. The rest is read and dropped, so
/// that a command printing without end neither blocks on a full pipe nor fills the agent's memory.
async fn read_head(reader: Option<impl AsyncRead + Unpin>, limit: usize, kept: &mut Vec<u8>) {
    let Some(mut reader) = reader else { return };
    let mut buffer = vec![0; 16 * 1024];
    loop {
        match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let room = limit - kept.len();
                kept.extend_from_slice(&buffer[..n.min(room)]);
            }
        }
    }
}

/// Reads to the end into `kept`, keeping at least the last `limit` bytes (and at most twice as
/// many: [`tail`] cuts them).
async fn read_tail(reader: Option<impl AsyncRead + Unpin>, limit: usize, kept: &mut Vec<u8>) {
    let Some(mut reader) = reader else { return };
    let mut buffer = vec![0; 16 * 1024];
    loop {
        match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                kept.extend_from_slice(&buffer[..n]);
                if kept.len() > 2 * limit {
                    kept.drain(..kept.len() - limit);
                }
            }
        }
    }
}

/// The last `limit` bytes of `bytes`.
fn tail(bytes: &[u8], limit: usize) -> &[u8] {
    &bytes[bytes.len().saturating_sub(limit)..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::tests::assignment;

    fn work_type(name: &str) -> WorkType {
        WorkType::parse(name).unwrap()
    }

    fn exec(program: &str, args: &[&str], timeout: Duration) -> Exec {
        Exec::new(timeout).command(work_type("deployment"), ExecCommand::new(program, args.iter().copied()))
    }

    #[tokio::test]
    async fn the_task_reaches_the_command_as_json_on_stdin() {
        let task = assignment("1.deploy", "Deploy Uptime Kuma", 60);
        let execution = exec("/bin/cat", &[], Duration::from_secs(10)).run(&task).await;
        assert!(execution.success, "{execution:?}");
        let echoed: TaskAssignment = serde_json::from_str(&execution.output).expect("the JSON task");
        assert_eq!(echoed, task);
    }

    #[tokio::test]
    async fn shell_metacharacters_in_the_task_stay_inert() {
        let marker = std::env::temp_dir().join(format!("pwned-{}", uuid::Uuid::new_v4()));
        let description = format!(
            "$(touch {0}); rm -rf / `touch {0}` ; touch {0} && echo \"'$HOME'\" | sh",
            marker.display()
        );
        let task = assignment("1.deploy", &description, 60);
        let execution = exec("/bin/cat", &[], Duration::from_secs(10)).run(&task).await;
        assert!(execution.success, "{execution:?}");
        assert!(!marker.exists(), "the task's text was run");
        let echoed: TaskAssignment = serde_json::from_str(&execution.output).unwrap();
        assert_eq!(echoed.task.description, description, "passed on literally");
    }

    #[tokio::test]
    async fn arguments_are_passed_as_they_are() {
        let task = assignment("1.deploy", "x", 60);
        let execution = exec("/bin/echo", &["$(id)", "a;b", "`x`"], Duration::from_secs(10)).run(&task).await;
        assert_eq!(execution.output, "$(id) a;b `x`\n");
    }

    #[tokio::test]
    async fn a_command_over_its_timeout_is_killed() {
        let task = assignment("1.deploy", "x", 60);
        let started = std::time::Instant::now();
        let execution = exec("/bin/sleep", &["5"], Duration::from_secs(1)).run(&task).await;
        assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
        assert!(!execution.success);
        assert_eq!(execution.error.as_deref(), Some("timed out after 1s"));
    }

    #[tokio::test]
    async fn a_non_zero_exit_is_a_failure_with_the_end_of_stderr() {
        // A test may use a shell to make a failing command; the executor itself never does.
        let task = assignment("1.deploy", "x", 60);
        let script = "cat >/dev/null; echo partial; echo 'disk full' >&2; exit 3";
        let execution = exec("/bin/sh", &["-c", script], Duration::from_secs(10)).run(&task).await;
        assert!(!execution.success);
        assert_eq!(execution.error.as_deref(), Some("exit code 3: disk full"));
        assert_eq!(execution.output, "partial\n");
    }

    #[tokio::test]
    async fn stderr_is_cut_to_its_tail() {
        let task = assignment("1.deploy", "x", 60);
        let script = "head -c 100000 /dev/zero | tr '\\0' x >&2; echo END >&2; exit 1";
        let execution = exec("/bin/sh", &["-c", script], Duration::from_secs(10)).run(&task).await;
        let error = execution.error.unwrap();
        assert!(error.ends_with("END"), "{}", &error[error.len() - 20..]);
        assert!(error.len() <= STDERR_TAIL_BYTES + 20, "{}", error.len());
    }

    #[tokio::test]
    async fn output_is_bounded() {
        let task = assignment("1.deploy", "x", 60);
        // 10 MiB of output, far over the limit: read through, kept up to the limit.
        let execution =
            exec("/usr/bin/head", &["-c", "10485760", "/dev/zero"], Duration::from_secs(20)).run(&task).await;
        assert!(execution.success, "{:?}", execution.error);
        assert_eq!(execution.output.len(), MAX_RESULT_OUTPUT_BYTES);
    }

    #[tokio::test]
    async fn output_is_cut_on_a_character_boundary() {
        let task = assignment("1.deploy", "x", 60);
        // "é" is two bytes; an odd offset before it puts the limit in the middle of one.
        let script = "printf a; i=0; while [ $i -lt 40000 ]; do printf 'é'; i=$((i+1)); done";
        let execution = exec("/bin/sh", &["-c", script], Duration::from_secs(20)).run(&task).await;
        assert!(execution.success);
        assert!(execution.output.len() <= MAX_RESULT_OUTPUT_BYTES);
        assert!(execution.output.len() >= MAX_RESULT_OUTPUT_BYTES - 4);
        assert!(!execution.output.contains('\u{fffd}'), "a character was cut");
    }

    #[tokio::test]
    async fn a_work_type_without_a_command_fails() {
        let mut task = assignment("1.design", "x", 60);
        task.task.work_type = work_type("code_generation");
        let execution = exec("/bin/cat", &[], Duration::from_secs(10)).run(&task).await;
        assert!(!execution.success);
        assert_eq!(execution.error.as_deref(), Some("no command configured for work type code_generation"));
    }

    #[tokio::test]
    async fn a_missing_program_fails_with_the_reason() {
        let task = assignment("1.deploy", "x", 60);
        let execution = exec("/nonexistent/deploy", &[], Duration::from_secs(10)).run(&task).await;
        assert!(!execution.success);
        assert!(execution.error.unwrap().starts_with("cannot start /nonexistent/deploy"));
    }

    #[tokio::test]
    async fn a_command_that_ignores_its_input_still_succeeds() {
        let task = assignment("1.deploy", &"long ".repeat(100_000), 60);
        let execution = exec("/bin/true", &[], Duration::from_secs(10)).run(&task).await;
        assert!(execution.success, "{execution:?}");
    }

    #[tokio::test]
    async fn the_command_gets_the_task_ids_and_an_allowed_environment_only() {
        let task = assignment("1.deploy", "x", 60);
        // Whatever the test process has (the integration tests have AMQP_URL and DATABASE_URL),
        // the command sees the allowed variables and its task's, nothing else.
        let execution = exec("/usr/bin/env", &[], Duration::from_secs(10)).run(&task).await;
        assert!(execution.success, "{execution:?}");
        let env: BTreeMap<&str, &str> =
            execution.output.lines().map(|line| line.split_once('=').expect("NAME=value")).collect();
        let task_id = task.task.id.to_string();
        assert_eq!(env["SWITCHYARD_TASK_ID"], task_id);
        assert_eq!(env["SWITCHYARD_WORK_TYPE"], "deployment");
        assert_eq!(env["SWITCHYARD_ATTEMPT"], "1");
        for name in env.keys() {
            assert!(
                PASSED_ENV.contains(name) || name.starts_with("SWITCHYARD_"),
                "{name} reached the command: {env:?}"
            );
        }
        for name in PASSED_ENV {
            assert_eq!(env.get(name).copied(), std::env::var(name).ok().as_deref(), "{name} is passed on");
        }
        assert_eq!(env.keys().filter(|name| name.starts_with("SWITCHYARD_")).count(), 3, "{env:?}");
    }

    /// A marker file that a test's command may create; removed on drop.
    struct Marker(std::path::PathBuf);

    impl Marker {
        fn new() -> Self {
            Marker(std::env::temp_dir().join(format!("switchyard-exec-{}", uuid::Uuid::new_v4())))
        }

        fn path(&self) -> &str {
            self.0.to_str().expect("a UTF-8 temporary directory")
        }
    }

    impl Drop for Marker {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[tokio::test]
    async fn a_timeout_kills_what_the_command_started_too() {
        // The command's script is the test's; the executor still runs a configured program.
        let marker = Marker::new();
        let task = assignment("1.deploy", "x", 60);
        let script = format!("(sleep 2; touch '{}') & sleep 30", marker.path());
        let started = std::time::Instant::now();
        let execution = exec("/bin/sh", &["-c", &script], Duration::from_secs(1)).run(&task).await;
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
        assert_eq!(execution.error.as_deref(), Some("timed out after 1s"));
        // Longer than the background child's sleep: had it survived, it would have touched it.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!marker.0.exists(), "the command's child outlived the timeout");
    }

    #[tokio::test]
    async fn a_dropped_run_kills_the_command_and_what_it_started() {
        let marker = Marker::new();
        let task = assignment("1.deploy", "x", 60);
        let script = format!("(sleep 2; touch '{}') & sleep 30", marker.path());
        let exec = exec("/bin/sh", &["-c", &script], Duration::from_secs(60));
        // As when the agent aborts the task.
        let run = tokio::time::timeout(Duration::from_millis(500), exec.run(&task)).await;
        assert!(run.is_err(), "the run was given up, not finished");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!marker.0.exists(), "the command's child outlived the run");
    }

    #[tokio::test]
    async fn a_command_that_leaves_a_child_in_the_background_completes_with_its_output() {
        let task = assignment("1.deploy", "x", 60);
        // The background `sleep` holds the command's standard output open long after it exited.
        let script = "cat >/dev/null; sleep 30 & echo \"started $!\"";
        let started = std::time::Instant::now();
        let execution = exec("/bin/sh", &["-c", script], Duration::from_secs(20)).run(&task).await;
        assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
        assert!(execution.success, "{execution:?}");
        let pid = execution.output.strip_prefix("started ").and_then(|rest| rest.trim().parse::<i32>().ok());
        let pid = pid.unwrap_or_else(|| panic!("the output: {:?}", execution.output));
        // Left running: the command exited on its own, its background process is its business.
        // SAFETY: kill has no memory-safety preconditions.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        unsafe { libc::kill(pid, libc::SIGKILL) };
        assert!(alive, "only a timed-out or dropped run kills what the command started");
    }

    #[test]
    fn the_configuration_file_is_read() {
        let config = ExecConfig::parse(
            "timeout_secs = 30\n[commands]\ndeployment = [\"/usr/local/bin/deploy\", \"--verbose\"]\n",
        )
        .unwrap();
        let exec = Exec::from_config(config).unwrap();
        assert_eq!(exec.timeout(), Duration::from_secs(30));
        assert_eq!(
            exec.commands()[&work_type("deployment")],
            ExecCommand::new("/usr/local/bin/deploy", ["--verbose"])
        );
        let empty = ExecConfig::parse("[commands]\ndeployment = []\n").unwrap();
        assert!(Exec::from_config(empty).unwrap_err().to_string().contains("empty"));
        assert!(ExecConfig::parse("[commands]\n\"Bad Type\" = [\"x\"]\n").is_err());
        assert!(ExecConfig::parse("bogus = 1\n").is_err());
    }
}
