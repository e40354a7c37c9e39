//! Every public future is `Send` when its inputs are (checked at compile time).

use std::time::Duration;

use stanchion_saga::{Executor, PgSagaLog, SagaId, SagaLogStore, SqliteSagaLog};

fn is_send<T: Send>(_: &T) {}

#[allow(dead_code)]
async fn futures_are_send(pg: PgSagaLog, lite: SqliteSagaLog, exec: Executor<PgSagaLog>) {
    let id = SagaId::from("x");
    is_send(&exec.begin("order", &1));
    is_send(&exec.wait(&id, Duration::from_secs(1)));
    is_send(&exec.history(&id));
    is_send(&exec.retry_parked(&id, "n"));
    is_send(&exec.shutdown(Duration::from_secs(1)));
    is_send(&pg.claim("o", Duration::from_secs(1), 1));
    is_send(&lite.get(&id));
    is_send(&pg.migrate());
    is_send(&lite.migrate());
}

#[test]
fn handles_are_send_and_sync() {
    fn check<T: Send + Sync + Clone>() {}
    check::<Executor<PgSagaLog>>();
    check::<Executor<SqliteSagaLog>>();
    check::<PgSagaLog>();
    check::<SqliteSagaLog>();
}
