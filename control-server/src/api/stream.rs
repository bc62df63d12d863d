//! The one pump behind every server stream (a node's `WatchNetworkMap`, a
//! relay's `WatchMembers`): the first update, then every later event of a
//! broadcast subscription turned into an update by a [`Feed`], a fresh full
//! state when the subscriber lagged behind the broadcast, and the end when
//! the feed says so or the client goes away.

use std::pin::Pin;

use futures::Stream;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

/// Updates a stream may have queued towards a slow client before the pump
/// waits for it (and the broadcast backlog absorbs the rest).
const STREAM_QUEUE: usize = 64;

/// A server stream as tonic wants it.
pub type UpdateStream<U> = Pin<Box<dyn Stream<Item = Result<U, Status>> + Send>>;

/// What to do with one event.
pub enum Step<U> {
    /// Nothing for this client (already in its state, or about another).
    Skip,
    Send(U),
    /// Several updates in a row (a full map in parts).
    SendAll(Vec<U>),
    /// End the stream with this error.
    End(Status),
}

/// Turns one subscriber's events into its updates. Owns whatever must live
/// as long as the stream (the guards that mark the subscriber offline), and
/// is dropped when the stream ends.
pub trait Feed: Send + 'static {
    type Event: Clone + Send + 'static;
    type Update: Send + 'static;
    /// A second source of updates besides the broadcast (a node's punch
    /// instructions); [`std::convert::Infallible`] for none.
    type Side: Send + 'static;

    fn event(&mut self, event: Self::Event) -> Step<Self::Update>;
    /// The subscriber missed `missed` events: a fresh full state, or the end.
    fn lagged(&mut self, missed: u64) -> Step<Self::Update>;
    fn side(&mut self, item: Self::Side) -> Self::Update;
}

/// Starts feeding a client: `first` (in order), then `feed`'s updates of
/// `events` and of `side`.
pub fn spawn<F: Feed>(
    feed: F,
    first: Vec<F::Update>,
    events: broadcast::Receiver<F::Event>,
    side: Option<mpsc::Receiver<F::Side>>,
) -> UpdateStream<F::Update> {
    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    tokio::spawn(pump(feed, first, events, side, tx));
    Box::pin(ReceiverStream::new(rx))
}

async fn pump<F: Feed>(
    mut feed: F,
    first: Vec<F::Update>,
    mut events: broadcast::Receiver<F::Event>,
    mut side: Option<mpsc::Receiver<F::Side>>,
    tx: mpsc::Sender<Result<F::Update, Status>>,
) {
    for update in first {
        if tx.send(Ok(update)).await.is_err() {
            return;
        }
    }
    loop {
        let event = tokio::select! {
            ev = events.recv() => ev,
            Some(item) = next(&mut side) => {
                if tx.send(Ok(feed.side(item))).await.is_err() {
                    break;
                }
                continue;
            }
            _ = tx.closed() => break,
        };
        let step = match event {
            Ok(ev) => feed.event(ev),
            Err(RecvError::Lagged(missed)) => feed.lagged(missed),
            Err(RecvError::Closed) => break,
        };
        let updates = match step {
            Step::Skip => continue,
            Step::Send(update) => vec![update],
            Step::SendAll(updates) => updates,
            Step::End(status) => {
                let _ = tx.send(Err(status)).await;
                break;
            }
        };
        for update in updates {
            if tx.send(Ok(update)).await.is_err() {
                return;
            }
        }
    }
    drop(feed);
}

/// The next item of an optional side channel; never, without one.
async fn next<T>(side: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match side {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
