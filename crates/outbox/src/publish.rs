//! The publishing seam and the in-process publisher.

use std::future::Future;

use tokio::sync::mpsc;

use crate::error::PublishError;
use crate::event::Message;

/// Sends messages to a broker. The relay hands it batches in which every ordering key appears
/// at most once, so a publisher may send a batch in any order or all at once (pipelined,
/// concurrently): the relay keeps per-key order by not sending a key's next event before the
/// previous one is acknowledged.
///
/// Return one outcome per message, in the order given. [`PublishError::Unavailable`] means the
/// broker is down (the relay backs off, the attempt is not counted);
/// [`PublishError::Rejected`] means this message was refused (counted towards dead-lettering).
///
/// A Kafka publisher, say, is a `FutureProducer::send` per message, joined:
///
/// ```
/// use stanchion_outbox::{Message, PublishError, Publisher};
/// /// Prints each message; a real one would call its broker's client here.
/// struct Stdout;
/// impl Publisher for Stdout {
///     async fn publish(&self, batch: &[Message]) -> Vec<Result<(), PublishError>> {
///         batch.iter().map(|m| { println!("{} {}", m.id, m.event_type); Ok(()) }).collect()
///     }
/// }
/// ```
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `batch` (distinct ordering keys), one outcome per message.
    fn publish(
        &self,
        batch: &[Message],
    ) -> impl Future<Output = Vec<Result<(), PublishError>>> + Send;
}

/// Publishes into a bounded in-process channel (tests, single-binary deployments, the
/// embedded default of the storefront). A full channel holds the relay back; a dropped receiver
/// makes every publish [`PublishError::Unavailable`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use stanchion_outbox::{ChannelPublisher, Message, MessageId, Publisher};
/// let (publisher, mut rx) = ChannelPublisher::new(16);
/// let out = publisher.publish(&[Message::new(MessageId(1), "k", "t", b"{}".to_vec())]).await;
/// assert!(out[0].is_ok());
/// assert_eq!(rx.recv().await.unwrap().id, MessageId(1));
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ChannelPublisher {
    tx: mpsc::Sender<Message>,
}

impl ChannelPublisher {
    /// A publisher and the receiver of its messages; `capacity` is at least 1.
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<Message>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Self { tx }, rx)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the receiving end of the channel is gone")]
struct Closed;

impl Publisher for ChannelPublisher {
    async fn publish(&self, batch: &[Message]) -> Vec<Result<(), PublishError>> {
        let mut out = Vec::with_capacity(batch.len());
        for m in batch {
            out.push(
                self.tx
                    .send(m.clone())
                    .await
                    .map_err(|_| PublishError::unavailable(Closed)),
            );
        }
        out
    }
}

impl<P: Publisher> Publisher for std::sync::Arc<P> {
    fn publish(
        &self,
        batch: &[Message],
    ) -> impl Future<Output = Vec<Result<(), PublishError>>> + Send {
        (**self).publish(batch)
    }
}
