//! An application that embeds an endpoint (`examples/endpoint.rs`) joins a
//! group, registers a protocol of its own and exchanges messages on it with
//! a `meshnode` process, on loopback through a relay.

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use peermesh_tests::{wait_for, Bins, Lab};

const ECHO: &str = "/example/echo/1";
/// Generous bound for things with no stated limit (process start-up, a path).
const SLOW: Duration = Duration::from_secs(30);

fn received(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn an_embedded_endpoint_speaks_its_own_protocol_with_a_meshnode() -> Result<()> {
    let mut lab = Lab::start()?;
    lab.server.create_group("g")?;
    let _relay = lab.relay("r1")?;
    let (t_node, t_app) = (lab.server.token("g")?, lab.server.token("g")?);
    let laptop = lab.node("laptop", Some(&t_node), &["--protocol", ECHO])?;
    // `recv` attaches once the node answers on its socket.
    wait_for(SLOW, "laptop's local API", || laptop.status())?;
    let inbox = lab.dir.path().join("laptop-echo.jsonl");
    let f = std::fs::File::create(&inbox)?;
    let mut recv = Command::new(&Bins::get().meshnode)
        .args(["recv", "--json", "--protocol", ECHO, "--state"])
        .arg(&laptop.state)
        .stdout(f)
        .spawn()?;

    let mut cmd = Command::new(&Bins::get().example_endpoint);
    cmd.arg("--control")
        .arg(lab.server.url())
        .arg("--token")
        .arg(&t_app)
        .arg("--state")
        .arg(lab.state_dir("app"))
        .args(["--name", "app", "--greet", "laptop"]);
    let app = lab.spawn("app", cmd)?;

    // The application greets the node on its own protocol…
    let greeting = wait_for(SLOW, "the application's greeting", || {
        received(&inbox)
            .into_iter()
            .find(|m| m["data"] == "hello from app")
    })
    .with_context(|| format!("application output:\n{}", app.output()))?;
    ensure!(greeting["name"] == "app", "{greeting}");
    // …and answers what the node sends it there.
    laptop.cli(&["send", "app", "hi", "--protocol", ECHO])?;
    wait_for(SLOW, "the application's answer", || {
        received(&inbox)
            .into_iter()
            .any(|m| m["data"] == "echo: hi")
            .then_some(())
    })
    .with_context(|| format!("application output:\n{}", app.output()))?;
    ensure!(
        app.output().contains("from ") && app.output().contains(": hi"),
        "the application printed what it got:\n{}",
        app.output()
    );
    // The node's messages protocol is not the application's: a message
    // there reaches nobody on the application (it serves only its own).
    laptop.cli(&["send", "app", "plain message"])?;
    std::thread::sleep(Duration::from_millis(300));
    ensure!(
        !received(&inbox)
            .iter()
            .any(|m| m["data"] == "echo: plain message"),
        "only the echo protocol is echoed"
    );
    // The node lists the application as a member with a path.
    let path = wait_for(SLOW, "a path to the application", || {
        laptop.path_to("app").filter(|p| p != "connecting")
    })?;
    ensure!(path == "relay" || path == "direct", "path {path}");
    let _ = recv.kill();
    let _ = recv.wait();
    Ok(())
}
