//! The endpoint's events: a broadcast to whoever watches, and the most
//! recent ones kept so that a late watcher sees how the links came up.

use std::collections::VecDeque;
use std::sync::Mutex;

use peermesh_base::event::{Event, EventKind};
use tokio::sync::broadcast;

/// Events kept for late watchers: every path change of a small group's
/// start-up and more, in bounded memory.
pub const EVENT_HISTORY: usize = 1024;
/// Events a live watcher may fall behind by before it misses some (it is
/// told how many, see [`Events::recv`]).
const EVENT_BACKLOG: usize = 1024;

/// Publishes events; cheap, and off the packet path (events are rare).
pub(crate) struct EventLog {
    /// The history and the broadcast are changed together under this lock,
    /// so that "history, then everything after it" is exact.
    history: Mutex<VecDeque<Event>>,
    tx: broadcast::Sender<Event>,
}

impl EventLog {
    pub(crate) fn new() -> Self {
        Self {
            history: Mutex::new(VecDeque::with_capacity(EVENT_HISTORY)),
            tx: broadcast::channel(EVENT_BACKLOG).0,
        }
    }

    pub(crate) fn publish(&self, kind: EventKind) {
        let event = Event::now(kind);
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        if h.len() == EVENT_HISTORY {
            h.pop_front();
        }
        h.push_back(event.clone());
        // No watcher is fine.
        let _ = self.tx.send(event);
    }

    /// The events kept, oldest first.
    pub(crate) fn recent(&self) -> Vec<Event> {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        h.iter().cloned().collect()
    }

    pub(crate) fn subscribe(&self) -> Events {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        Events {
            replay: h.iter().cloned().collect(),
            live: self.tx.subscribe(),
        }
    }
}

/// The endpoint's events: first the recent history, then live ones.
pub struct Events {
    replay: VecDeque<Event>,
    live: broadcast::Receiver<Event>,
}

/// What [`Events::recv`] gives.
#[derive(Debug, PartialEq)]
pub enum Received {
    Event(Event),
    /// The watcher fell this many events behind and missed them.
    Missed(u64),
    /// The endpoint is gone.
    Closed,
}

impl Events {
    pub async fn recv(&mut self) -> Received {
        if let Some(e) = self.replay.pop_front() {
            return Received::Event(e);
        }
        match self.live.recv().await {
            Ok(e) => Received::Event(e),
            Err(broadcast::error::RecvError::Lagged(n)) => Received::Missed(n),
            Err(broadcast::error::RecvError::Closed) => Received::Closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(relays: usize) -> EventKind {
        EventKind::RelayDirectory { relays }
    }

    #[tokio::test]
    async fn late_watchers_get_the_history_then_live_events() {
        let log = EventLog::new();
        log.publish(dir(1));
        log.publish(dir(2));
        let mut w = log.subscribe();
        log.publish(dir(3));
        assert_eq!(log.recent().len(), 3);
        for n in 1..=3 {
            match w.recv().await {
                Received::Event(e) => assert_eq!(e.kind, dir(n)),
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn history_is_bounded() {
        let log = EventLog::new();
        for n in 0..EVENT_HISTORY + 10 {
            log.publish(dir(n));
        }
        let mut w = log.subscribe();
        match w.recv().await {
            Received::Event(e) => assert_eq!(e.kind, dir(10)),
            other => panic!("{other:?}"),
        }
        drop(log);
        for _ in 1..EVENT_HISTORY {
            assert!(matches!(w.recv().await, Received::Event(_)));
        }
        assert_eq!(w.recv().await, Received::Closed);
    }
}
