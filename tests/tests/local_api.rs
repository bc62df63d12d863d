//! The node's local API as other users of the machine meet it: owner-only
//! by default; with `up --status-uid`, that user may read status but not
//! command the node; any other user is refused by its credentials
//! (SO_PEERCRED), not only by file modes.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use peermesh_tests::{wait_for, Bins, Lab};

/// The user allowed to read status (Debian's `nobody`).
const READER: u32 = 65534;
/// A user given nothing.
const STRANGER: u32 = 65533;

/// Runs the meshnode binary at `bin` as `uid`.
fn as_user(uid: u32, bin: &Path, args: &[&str]) -> Result<Output> {
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .arg(bin)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .context("running setpriv")
}

fn mode(p: &Path) -> Result<u32> {
    Ok(std::fs::metadata(p)?.permissions().mode() & 0o777)
}

#[test]
fn other_users_read_status_only_when_allowed_and_never_command() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var("CI").is_err(),
            "CI=true: this test needs root (it runs clients as other users)"
        );
        eprintln!("skipped: needs root to act as other users");
        return Ok(());
    }
    let mut lab = Lab::start()?;
    lab.server.create_group("g")?;
    let ta = lab.server.token("g")?;
    let tb = lab.server.token("g")?;
    let uid = READER.to_string();
    let a = lab.node("a", Some(&ta), &["--status-uid", &uid])?;
    let b = lab.node("b", Some(&tb), &[])?;
    for n in [&a, &b] {
        wait_for(Duration::from_secs(60), "the node's local API", || {
            n.status_typed()
        })?;
    }
    // Other users must be able to reach the state directories' parent and
    // run the binary.
    std::fs::set_permissions(lab.dir.path(), std::fs::Permissions::from_mode(0o711))?;
    let bin_dir = tempfile::Builder::new()
        .prefix("peermesh-localapi-")
        .tempdir()?;
    std::fs::set_permissions(bin_dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let bin = bin_dir.path().join("meshnode");
    std::fs::copy(&Bins::get().meshnode, &bin)?;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;

    let sock = |n: &peermesh_tests::Node| peermesh_node::local_api::socket_path(&n.state);
    // Without --status-uid: owner-only socket in an owner-only directory.
    ensure!(
        mode(&sock(&b))? == 0o600,
        "b's socket is {:o}",
        mode(&sock(&b))?
    );
    ensure!(
        mode(&b.state)? == 0o700,
        "b's state is {:o}",
        mode(&b.state)?
    );
    // With it: connectable, and the directory traversable but not listable.
    ensure!(
        mode(&sock(&a))? == 0o666,
        "a's socket is {:o}",
        mode(&sock(&a))?
    );
    ensure!(
        mode(&a.state)? == 0o711,
        "a's state is {:o}",
        mode(&a.state)?
    );

    let a_state = a.state.to_str().context("path")?;
    let b_state = b.state.to_str().context("path")?;

    // The allowed reader sees a's status.
    let out = as_user(READER, &bin, &["status", "--state", a_state, "--json"])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && stdout.contains("\"name\""),
        "status as uid {READER}: {}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    // …but cannot command it.
    let out = as_user(READER, &bin, &["send", "--state", a_state, "b", "hello"])?;
    let err =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    ensure!(
        !out.status.success() && err.contains("is a command"),
        "send as uid {READER} was not refused as a command: {err}"
    );
    // A stranger reaches a's socket but is refused by its credentials.
    let out = as_user(STRANGER, &bin, &["status", "--state", a_state])?;
    let err =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    ensure!(
        !out.status.success() && err.contains(&format!("uid {STRANGER} may not use")),
        "status as uid {STRANGER} was not refused: {err}"
    );
    // Nobody but the owner reaches b at all.
    let out = as_user(READER, &bin, &["status", "--state", b_state])?;
    ensure!(
        !out.status.success(),
        "uid {READER} read b's status: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The owner (root here) still does everything.
    a.cli(&["send", "b", "from-the-owner"])?;
    Ok(())
}

/// `--state` naming a directory of another user is refused, not taken over.
#[test]
fn a_state_directory_of_another_user_is_refused() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var("CI").is_err(),
            "CI=true: this test needs root"
        );
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let theirs = dir.path().join("theirs");
    std::fs::create_dir(&theirs)?;
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o755))?;
    std::os::unix::fs::chown(&theirs, Some(READER), Some(READER))?;
    let out = Command::new(&Bins::get().meshnode)
        .args(["up", "--control", "http://127.0.0.1:9", "--state"])
        .arg(&theirs)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains(&format!("belongs to uid {READER}")),
        "meshnode up took another user's directory: {err}"
    );
    ensure!(mode(&theirs)? == 0o755, "its mode changed");
    Ok(())
}
