//! Addresses, MTU and routes of the interface, set with iproute2's `ip`
//! (installed by `scripts/setup`): `ip link set … mtu … up`, `ip addr
//! replace ADDR/10` and `ip -6 addr replace ADDR/48`. The prefix lengths
//! make the kernel add the routes for the whole mesh (100.64.0.0/10 and the
//! server's ULA /48) through the interface; addresses that no peer owns are
//! dropped and counted by the service.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::TunError;

pub const V4_PREFIX: u8 = 10;
pub const V6_PREFIX: u8 = 48;

async fn ip(args: &[&str]) -> Result<(), TunError> {
    let out = tokio::process::Command::new("ip")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| TunError::Config {
            command: format!("ip {}", args.join(" ")),
            error: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(TunError::Config {
            command: format!("ip {}", args.join(" ")),
            error: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Brings `name` up with `mtu` and the node's mesh addresses, replacing the
/// addresses it had (so a changed assignment takes effect). An IPv6 failure
/// (IPv6 disabled on the host) is logged, not fatal.
pub async fn configure(
    name: &str,
    mtu: u16,
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
) -> Result<(), TunError> {
    ip(&["link", "set", "dev", name, "mtu", &mtu.to_string()]).await?;
    ip(&["addr", "flush", "dev", name]).await?;
    if let Some(v4) = v4 {
        ip(&["addr", "replace", &format!("{v4}/{V4_PREFIX}"), "dev", name]).await?;
    }
    if let Some(v6) = v6 {
        // A namespace may create devices with IPv6 off
        // (net.ipv6.conf.default.disable_ipv6); turn it on for ours.
        let knob = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
        if let Err(e) = tokio::fs::write(&knob, "0").await {
            tracing::debug!(error = %e, %knob, "could not enable IPv6 on the interface");
        }
        let a = format!("{v6}/{V6_PREFIX}");
        if let Err(e) = ip(&["-6", "addr", "replace", &a, "dev", name, "nodad"]).await {
            tracing::warn!(error = %e, "no IPv6 mesh address on the interface");
        }
    }
    ip(&["link", "set", "dev", name, "up"]).await
}
