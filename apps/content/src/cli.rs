//! `meshnode get`: the progress bar and the report.

use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};

use peermesh_node::NodeError;

use crate::{get_via_socket, FetchReport, GetRequest};

/// Runs a fetch through the node behind `socket`, with a progress bar on stderr when `bar`.
pub async fn get(socket: &Path, req: &GetRequest, bar: bool) -> Result<FetchReport, NodeError> {
    let pb = if bar {
        let pb = ProgressBar::new(0);
        pb.set_style(
            ProgressStyle::with_template(
                "{bar:40.cyan/blue} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        pb
    } else {
        ProgressBar::hidden()
    };
    let r = get_via_socket(socket, req, |p| {
        pb.set_length(p.size);
        pb.set_position(p.bytes_done);
        let moved = p.bytes_from_origin + p.bytes_from_peers;
        let share = if moved == 0 {
            0.0
        } else {
            100.0 * p.bytes_from_origin as f64 / moved as f64
        };
        let refused = if p.peers_refused > 0 {
            format!(" refused {}", p.peers_refused)
        } else {
            String::new()
        };
        pb.set_message(format!(
            "chunks {}/{} origin {share:.0}% peers active {}{refused}",
            p.chunks_done, p.chunks, p.peers_active
        ));
    })
    .await;
    pb.finish_and_clear();
    r
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

/// The human-readable report.
pub fn print_report(r: &FetchReport) {
    println!(
        "{} ({:.1} MiB) -> {} in {:.2} s",
        r.name,
        mib(r.size),
        r.output.display(),
        r.seconds
    );
    println!("blake3   {}", r.file_hash);
    println!(
        "origin   {:.1} MiB ({:.1}% of the bytes moved); peers {:.1} MiB; cached {:.1} MiB",
        mib(r.bytes_from_origin),
        100.0 * r.origin_share,
        mib(r.bytes_from_peers),
        mib(r.bytes_cached)
    );
    for p in &r.peers {
        let who = if p.name.is_empty() { &p.id } else { &p.name };
        println!(
            "  from {who:<20} {:>8.1} MiB in {} chunks",
            mib(p.bytes),
            p.chunks
        );
    }
    for p in &r.refused {
        let who = if p.name.is_empty() { &p.id } else { &p.name };
        let what = if p.kind.is_snub() {
            "SNUBBED "
        } else {
            "REFUSED "
        };
        println!("{what} {who} ({}) {}: {}", p.id, p.kind.as_str(), p.reason);
    }
    if r.bad_chunks > 0 || r.retried_requests > 0 {
        println!(
            "bad chunks {}, requests retried {} ({} busy, {} timed out)",
            r.bad_chunks, r.retried_requests, r.busy_answers, r.timed_out_requests
        );
    }
    let limit = r.cache_limit.map_or("no limit".to_string(), |l| {
        format!("limit {:.1} MiB", mib(l))
    });
    println!(
        "cache    {:.1} MiB ({limit}; {} chunks evicted since the node started)",
        mib(r.cache_bytes),
        r.evicted_chunks
    );
}
