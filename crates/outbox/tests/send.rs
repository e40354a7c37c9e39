//! Every public future is `Send` when its inputs are (checked at compile time; the test
//! fails to build otherwise).

use std::time::Duration;

use stanchion_outbox::{
    ChannelPublisher, Event, Message, OutboxStore, PgInbox, PgOutbox, Publisher,
    RedisStreamConsumer, RedisStreamPublisher, Relay, SqliteInbox, SqliteOutbox,
};

fn is_send<T: Send>(_: &T) {}

#[allow(dead_code, clippy::diverging_sub_expression)]
async fn futures_are_send(
    pg: PgOutbox,
    lite: SqliteOutbox,
    mut pg_conn: sqlx::PgConnection,
    mut lite_conn: sqlx::SqliteConnection,
    redis: redis::aio::ConnectionManager,
    nats: async_nats::Client,
) {
    let e = Event::new("k", "t", Vec::new());
    is_send(&pg.enqueue(&mut pg_conn, &e));
    is_send(&pg.enqueue_batch(&mut pg_conn, std::slice::from_ref(&e)));
    is_send(&lite.enqueue(&mut lite_conn, &e));
    is_send(&lite.enqueue_batch(&mut lite_conn, std::slice::from_ref(&e)));
    is_send(&pg.claim_lanes("r", 1, Duration::from_secs(1)));
    is_send(&lite.stats());
    is_send(&pg.purge_published(Duration::ZERO, 1));
    is_send(&lite.dead_letters(None, 1));
    let inbox = PgInbox::new(pg.config());
    is_send(&inbox.first_delivery(&mut pg_conn, "c", "m"));
    let inbox = SqliteInbox::new(lite.config());
    is_send(&inbox.first_delivery(&mut lite_conn, "c", "m"));
    let (channel, _rx) = ChannelPublisher::new(1);
    let batch = [Message::new(
        stanchion_outbox::MessageId(1),
        "k",
        "t",
        Vec::new(),
    )];
    is_send(&channel.publish(&batch));
    let publisher = RedisStreamPublisher::new(redis.clone(), "s");
    is_send(&publisher.publish(&batch));
    let consumer = RedisStreamConsumer::new(redis, "s", "g", "c");
    is_send(&consumer.read(1, None));
    is_send(&consumer.claim_idle(Duration::from_secs(1), 1));
    let js = async_nats::jetstream::new(nats);
    let jsp = stanchion_outbox::JetStreamPublisher::new(js.clone(), "s");
    is_send(&jsp.publish(&batch));
    is_send(&jsp.ensure_stream("S", Duration::from_secs(1)));
    is_send(&stanchion_outbox::JetStreamConsumer::durable(
        &js,
        "S",
        "d",
        Duration::from_secs(1),
    ));
    let relay = Relay::builder(lite, channel).build().unwrap();
    is_send(&relay.start());
}

#[test]
fn handles_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<PgOutbox>();
    check::<SqliteOutbox>();
    check::<stanchion_outbox::RelayHandle<SqliteOutbox, ChannelPublisher>>();
    check::<RedisStreamPublisher<redis::aio::ConnectionManager>>();
    check::<RedisStreamConsumer<redis::aio::ConnectionManager>>();
    check::<stanchion_outbox::JetStreamPublisher>();
    check::<stanchion_outbox::JetStreamConsumer>();
}
