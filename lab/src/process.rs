//! One `tapestry run` process with its data directory: started with its
//! log in `DIR/node.log`, found through the `endpoints.json` it writes,
//! stopped with SIGTERM or SIGKILL, and killed when dropped so that
//! nothing outlives a failing test or an interrupted command.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::error::LabError;

/// A running (or stopped) node process.
pub struct NodeProcess {
    dir: PathBuf,
    child: Option<Child>,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

impl NodeProcess {
    /// Starts `cmd` (a `tapestry run --data-dir DIR ...` command line, the
    /// caller's) for the node in `dir`: its standard error appended to
    /// `DIR/node.log`, its standard output discarded, `RUST_LOG` at info
    /// (libp2p at warn) unless the command sets it or this process has
    /// `TAPESTRY_NODE_LOG` (its value then: to look into a failing test's
    /// nodes more closely). A stale
    /// `endpoints.json` is removed first, so [`NodeProcess::endpoints`]
    /// sees this run's.
    pub fn spawn(mut cmd: Command, dir: &Path) -> Result<NodeProcess, LabError> {
        let _ = std::fs::remove_file(dir.join("endpoints.json"));
        let path = dir.join("node.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(LabError::io(path))?;
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            let level = std::env::var("TAPESTRY_NODE_LOG");
            cmd.env("RUST_LOG", level.as_deref().unwrap_or("info,libp2p=warn"));
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| LabError::Start {
                program: cmd.get_program().to_owned(),
                source,
            })?;
        Ok(NodeProcess {
            dir: dir.to_path_buf(),
            child: Some(child),
        })
    }

    /// A node in `dir` that is not started yet (a late joiner).
    pub fn idle(dir: &Path) -> NodeProcess {
        NodeProcess {
            dir: dir.to_path_buf(),
            child: None,
        }
    }

    /// The node's data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the process was started and not yet stopped here.
    pub fn up(&self) -> bool {
        self.child.is_some()
    }

    /// The node's `endpoints.json` (node and peer ids, API and listen
    /// addresses), once it has written it; `None` after `wait`.
    pub fn endpoints(&self, wait: Duration) -> Option<Value> {
        let deadline = Instant::now() + wait;
        loop {
            if let Ok(text) = std::fs::read_to_string(self.dir.join("endpoints.json"))
                && let Ok(v) = serde_json::from_str(&text)
            {
                return Some(v);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The node's API address, once it has written its endpoints; `None`
    /// after `wait`.
    pub fn api(&self, wait: Duration) -> Option<String> {
        self.endpoints(wait)
            .and_then(|e| e["api"].as_str().map(str::to_owned))
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its resident memory (VmRSS) in bytes, read from `/proc` (Linux).
    pub fn rss_bytes(&self) -> Option<u64> {
        self.proc_status_bytes("VmRSS:")
    }

    /// The most resident memory it has had (VmHWM) in bytes, read from
    /// `/proc` (Linux).
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        self.proc_status_bytes("VmHWM:")
    }

    /// A `kB` field of `/proc/PID/status`, in bytes.
    fn proc_status_bytes(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    /// Everything the node has logged (all its runs in this directory).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }

    /// SIGKILL, no chance to clean up; waits for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then its exit status within `wait`; `None` if it had to be
    /// killed (or was not running).
    pub fn terminate(&mut self, wait: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + wait;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `TAPESTRY init --data-dir DIR ARGS...`: a new node directory (its key
/// and commented `config.toml`).
pub fn init<S: AsRef<std::ffi::OsStr>>(
    tapestry: &Path,
    dir: &Path,
    args: &[S],
) -> Result<(), LabError> {
    let out = Command::new(tapestry)
        .args(["init", "--data-dir"])
        .arg(dir)
        .args(args)
        .output()
        .map_err(|source| LabError::Run {
            program: tapestry.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(LabError::Init(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(())
}

/// The command line `TAPESTRY run` for the node in `dir` on loopback (an
/// ephemeral TCP port and API port; see [`NodeProcess::api`]), `args`
/// after: to start with [`NodeProcess::spawn`] (or [`run_local`]).
pub fn local_run<S: AsRef<std::ffi::OsStr>>(tapestry: &Path, dir: &Path, args: &[S]) -> Command {
    let mut cmd = Command::new(tapestry);
    cmd.args(["run", "--data-dir"])
        .arg(dir)
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0"])
        .args(args);
    cmd
}

/// Starts [`local_run`].
pub fn run_local<S: AsRef<std::ffi::OsStr>>(
    tapestry: &Path,
    dir: &Path,
    args: &[S],
) -> Result<NodeProcess, LabError> {
    NodeProcess::spawn(local_run(tapestry, dir, args), dir)
}

/// The `/status` document of the node whose API is at `addr` (5-s
/// timeout).
pub fn status(addr: &str) -> Result<Value, LabError> {
    let body = tapestry_node::api::get(addr, "/status", Duration::from_secs(5))?;
    serde_json::from_str(&body).map_err(|source| LabError::Status {
        addr: addr.to_owned(),
        source,
    })
}

/// Sets the first `key = ...` line of the node's `config.toml` in `dir`
/// to `key = value` (`value` written as TOML: quote strings). An error if
/// the file has no such key.
pub fn set_config(dir: &Path, key: &str, value: &str) -> Result<(), LabError> {
    let cfg = dir.join("config.toml");
    let text = std::fs::read_to_string(&cfg).map_err(LabError::io(&cfg))?;
    let mut done = false;
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            if !done && l.starts_with(&format!("{key} =")) {
                done = true;
                format!("{key} = {value}")
            } else {
                l.to_owned()
            }
        })
        .collect();
    if !done {
        return Err(LabError::NoConfigKey {
            key: key.to_owned(),
            path: cfg,
        });
    }
    std::fs::write(&cfg, out.join("\n") + "\n").map_err(LabError::io(&cfg))
}

/// Bytes allocated on disk under `path` (blocks, not apparent sizes; 0 if
/// it cannot be read): what a node's store takes.
pub fn disk_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    own + std::fs::read_dir(path)
        .map(|d| d.flatten().map(|e| disk_bytes(&e.path())).sum::<u64>())
        .unwrap_or(0)
}
