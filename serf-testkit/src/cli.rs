//! Running the `serf` command line: locating the binary, timeouts, `serf keygen`.

use std::ffi::OsStr;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Default timeout for one `serf` CLI call made by the harness.
pub const DEFAULT_CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// The `serf` executable: `$SERF_BIN` if set and non-empty, else `serf` (looked up in `PATH`).
pub fn serf_binary() -> PathBuf {
    match std::env::var_os("SERF_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from("serf"),
    }
}

/// A `Command` for `binary` that does not pick up `SERF_RPC_ADDR`/`SERF_RPC_AUTH`
/// from the test's environment.
pub(crate) fn serf_command(binary: &Path) -> Command {
    let mut cmd = Command::new(binary);
    cmd.env_remove("SERF_RPC_ADDR")
        .env_remove("SERF_RPC_AUTH")
        .stdin(Stdio::null());
    cmd
}

/// Turns a spawn error into one that says what to do when the binary is missing.
pub(crate) fn spawn_error(binary: &Path, what: &str, e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::NotFound {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "serf-testkit: cannot {what}: serf binary `{}` not found ({e}); \
                 install Debian's `serf` package (apt-get install -y serf) \
                 or set SERF_BIN to the path of a serf executable",
                binary.display()
            ),
        )
    } else {
        io::Error::new(
            e.kind(),
            format!(
                "serf-testkit: cannot {what}: failed to run `{}`: {e}",
                binary.display()
            ),
        )
    }
}

fn read_pipe(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            // A read error just ends the captured output.
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

fn join_pipe(h: thread::JoinHandle<Vec<u8>>) -> Vec<u8> {
    h.join().unwrap_or_default()
}

fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `cmd` to completion, capturing stdout and stderr, killing it after `timeout`.
///
/// `what` names the call in error messages.
pub(crate) fn output_with_timeout(
    mut cmd: Command,
    binary: &Path,
    timeout: Duration,
    what: &str,
) -> io::Result<Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| spawn_error(binary, what, e))?;
    let out = read_pipe(child.stdout.take());
    let err = read_pipe(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => {
                kill_and_reap(&mut child);
                return Err(io::Error::new(
                    e.kind(),
                    format!("serf-testkit: {what}: waiting for the serf process failed: {e}"),
                ));
            }
        }
        if Instant::now() >= deadline {
            kill_and_reap(&mut child);
            let stdout = String::from_utf8_lossy(&join_pipe(out)).into_owned();
            let stderr = String::from_utf8_lossy(&join_pipe(err)).into_owned();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "serf-testkit: {what}: no exit after {timeout:?}, killed it; \
                     stdout: {stdout:?}; stderr: {stderr:?}"
                ),
            ));
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: join_pipe(out),
        stderr: join_pipe(err),
    })
}

/// Runs `serf <args>` (no agent address added) with `timeout`, returning its output
/// whatever the exit status.
///
/// `SERF_RPC_ADDR` and `SERF_RPC_AUTH` are removed from its environment.
pub fn serf_output<S: AsRef<OsStr>>(args: &[S], timeout: Duration) -> io::Result<Output> {
    let binary = serf_binary();
    let mut cmd = serf_command(&binary);
    cmd.args(args);
    let what = format!("run `serf {}`", display_args(args));
    output_with_timeout(cmd, &binary, timeout, &what)
}

/// `args` joined with spaces, for messages.
pub(crate) fn display_args<S: AsRef<OsStr>>(args: &[S]) -> String {
    args.iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Describes a finished command's status and output, for error messages.
pub(crate) fn describe_output(o: &Output) -> String {
    format!(
        "{}; stdout: {:?}; stderr: {:?}",
        o.status,
        String::from_utf8_lossy(&o.stdout).trim_end(),
        String::from_utf8_lossy(&o.stderr).trim_end()
    )
}

/// Generates a new gossip encryption key with `serf keygen` (base64 of 32 random bytes).
pub fn keygen() -> io::Result<String> {
    let out = serf_output(&["keygen"], DEFAULT_CLI_TIMEOUT)?;
    let key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || key.is_empty() || key.contains(char::is_whitespace) {
        return Err(io::Error::other(format!(
            "serf-testkit: `serf keygen` failed: {}",
            describe_output(&out)
        )));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_gives_a_44_char_key() {
        let k = keygen().unwrap();
        assert_eq!(k.len(), 44, "{k}");
        assert!(k.ends_with('='));
        assert_ne!(k, keygen().unwrap());
    }

    #[test]
    fn missing_binary_says_how_to_install() {
        let bin = Path::new("/nonexistent/serf-testkit/serf");
        let cmd = serf_command(bin);
        let err = output_with_timeout(cmd, bin, Duration::from_secs(1), "run it").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("apt-get install -y serf"), "{err}");
    }

    #[test]
    fn timeout_kills_the_command() {
        let mut cmd = Command::new("sleep");
        cmd.arg("10");
        let t = Instant::now();
        let err = output_with_timeout(cmd, Path::new("sleep"), Duration::from_millis(200), "nap")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
