//! Link reports: what each node says about its links to the others, and the
//! table administrators read.

use std::collections::HashMap;

use peermesh_proto::api::{LinkEntry, LinkReport, PathKind};
use peermesh_proto::store::v1::{LinkRecord, NodeRecord};

use super::{NodeCtx, Registry};
use crate::error::{ControlError, Result};
use crate::store::Txn;
use crate::validate;

/// Longest round-trip time a link report may carry: an hour. No path the
/// mesh keeps has a round trip anywhere near it, so a larger value is a
/// broken measurement (a clock jump, garbage) and is refused rather than
/// shown in the table.
const MAX_RTT_MS: f64 = 3_600_000.0;

impl Registry {
    /// Replaces the caller's link reports. Reports about nodes that are not
    /// (or no longer) members are dropped: maps change under the reporter.
    pub fn report_links(&self, ctx: &NodeCtx, links: Vec<LinkReport>) -> Result<usize> {
        if links.len() > validate::MAX_LINKS {
            return Err(ControlError::invalid(format!(
                "{} link reports; the limit is {}",
                links.len(),
                validate::MAX_LINKS
            )));
        }
        for l in &links {
            validate::bytes_limit("peer_id", l.peer_id.len(), validate::MAX_TOKEN_LEN)?;
            validate::bytes_limit("via", l.via.len(), validate::MAX_TOKEN_LEN)?;
            match PathKind::try_from(l.path) {
                Ok(PathKind::Unspecified) | Err(_) => {
                    return Err(ControlError::invalid(format!(
                    "link to {}: path kind {} is not one of connecting, relay, direct, forwarded",
                    l.peer_id, l.path
                )))
                }
                Ok(_) => {}
            }
            if let Some(rtt) = l.rtt_ms {
                if !rtt.is_finite() || !(0.0..=MAX_RTT_MS).contains(&rtt) {
                    return Err(ControlError::invalid(format!(
                        "link to {}: rtt_ms {rtt} is not a duration",
                        l.peer_id
                    )));
                }
            }
            if !l.loss.is_finite() || !(0.0..=1.0).contains(&l.loss) {
                return Err(ControlError::invalid(format!(
                    "link to {}: loss {} is not within 0..1",
                    l.peer_id, l.loss
                )));
            }
        }
        let group = self.group(&ctx.group)?;
        let g = group.lock();
        let now = self.now();
        let kept: Vec<(String, LinkRecord)> = links
            .into_iter()
            .filter(|l| l.peer_id != ctx.node_id && g.is_member(&l.peer_id))
            .map(|l| {
                (
                    l.peer_id.clone(),
                    LinkRecord {
                        link: Some(l),
                        reported_ms: now,
                    },
                )
            })
            .collect();
        let mut txn = Txn::new();
        self.store.replace_links(&mut txn, &ctx.node_id, &kept)?;
        self.store.commit(txn)?;
        Ok(kept.len())
    }

    pub fn link_table(&self, group: &str) -> Result<Vec<LinkEntry>> {
        let nodes: HashMap<String, NodeRecord> = self
            .store
            .nodes()?
            .into_iter()
            .map(|n| (n.node_id.clone(), n))
            .collect();
        let mut out = Vec::new();
        for (from, to, rec) in self.store.links()? {
            let Some(f) = nodes.get(&from) else { continue };
            if !group.is_empty() && f.group != group {
                continue;
            }
            let Some(link) = rec.link else { continue };
            out.push(LinkEntry {
                group: f.group.clone(),
                from_node: from,
                from_name: f.name.clone(),
                to_name: nodes.get(&to).map(|n| n.name.clone()).unwrap_or_default(),
                link: Some(link),
                reported_ms: rec.reported_ms,
            });
        }
        Ok(out)
    }
}
