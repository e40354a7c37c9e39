//! Every public future is `Send` when its inputs are (so it can be spawned or awaited in an axum
//! handler).

use std::time::Duration;

use stanchion_shard_router::{IdGenerator, IdLayout, Scatter};

fn assert_send<T: Send>(_: &T) {}

#[test]
fn public_futures_are_send() {
    let scatter = Scatter::new(Duration::from_secs(1)).unwrap();
    let f = scatter.run(
        vec![(0_u32, 1_u64)],
        |_, n| async move { Ok::<_, String>(n) },
    );
    assert_send(&f);
    let ids = IdGenerator::new(IdLayout::bigint(0), 0).unwrap();
    let f = ids.next(1);
    assert_send(&f);
}

#[cfg(feature = "postgres")]
#[test]
fn cutover_futures_are_send() {
    use stanchion_shard_router::cutover::{Cutover, guard_write, install};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    // Lazy pools: nothing connects; only the futures' types matter here.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect_lazy("postgres://nobody@127.0.0.1:1/none")
        .unwrap();
    let c = Cutover::new(pool.clone(), pool.clone(), vec![1], 2, Vec::new());
    assert_send(&c.run());
    assert_send(&c.release());
    assert_send(&c.abort());
    assert_send(&install(&pool, &[1], 1));
    let check = |conn: &mut sqlx::PgConnection| {
        let f = guard_write(conn, 1);
        assert_send(&f);
    };
    let _ = check;
}
