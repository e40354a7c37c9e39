//! Moving slots between PostgreSQL databases while writers keep writing (feature `postgres`).
//!
//! Every shard database has a small ownership table, `stanchion_slot_owner (slot, state,
//! version)`, naming the slots it owns. Writers call [`guard_write`] inside their transaction
//! before writing a row of a slot: it takes a share lock on the slot's row and refuses unless
//! this database owns the slot. A [`Cutover`] moves a set of slots from one database to another:
//!
//! 1. **prepare**: the target records the slots as `incoming` (writes there are refused);
//! 2. **copy**: rows of the slots are copied in key order, in batches, while writers go on,
//!    then compared once and brought up to date (still live);
//! 3. **fence**: the source marks the slots `fenced`; the update waits for writers already
//!    holding the share lock to commit, and writers after it are refused with
//!    [`RouteError::SlotFenced`] (they retry shortly);
//! 4. **sync**: rows written during the copy are brought over (each row compared by an md5 of its
//!    JSON form; changed and new rows copied, rows deleted at the source deleted at the target);
//! 5. **verify**: row count and an ordered checksum of the moved rows must match on both sides;
//! 6. **switch**: the target marks the slots `owned` at the new map version, then the source
//!    marks them `moved`; writers still holding the old map are refused on the source with
//!    [`RouteError::SlotMoved`], reload the map and write to the target;
//! 7. **release**: the moved rows are deleted from the source in batches.
//!
//! A failure before the switch leaves the source fenced and the target partly filled:
//! [`Cutover::abort`] unfences the source and removes the copies, or [`Cutover::run`] again
//! picks up from there and finishes the move (from inside the switch, it only completes the
//! switch and releases; after it, it only releases). After the switch, a failure
//! in release leaves dead rows on the source, which [`Cutover::release`] removes when run
//! again. Rows must carry their slot in a column (written with the row, from
//! [`crate::slot_of`] or the id), so the database can select a slot's rows.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row};

use crate::error::RouteError;

/// The ownership table every shard database holds.
pub const OWNER_TABLE_SQL: &str = "CREATE TABLE IF NOT EXISTS stanchion_slot_owner (
    slot integer PRIMARY KEY,
    state text NOT NULL CHECK (state IN ('owned', 'incoming', 'fenced', 'moved')),
    version bigint NOT NULL
)";

/// A cutover or guard failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CutoverError {
    /// The database refused or the connection failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// The write was refused by slot ownership.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// A name given for a table or column is not a plain identifier.
    #[error("`{field}` must be a plain lower-case identifier (letters, digits, `_`, at most 63)")]
    BadIdentifier {
        /// The field.
        field: &'static str,
    },
    /// The source does not own every slot it was asked to move.
    #[error("the source owns {owned} of the {asked} slots to move; nothing was changed")]
    NotOwner {
        /// Slots the source holds: `owned`, or `fenced` by a cutover that stopped before its
        /// switch.
        owned: usize,
        /// Slots asked for.
        asked: usize,
    },
    /// The copy does not match the source after the sync (left fenced: abort or run again).
    #[error("table {table}: verify failed: source {source_rows} rows, target {target_rows} rows, checksums {}", if *.checksums_match { "equal" } else { "differ" })]
    Verify {
        /// The table.
        table: String,
        /// Rows at the source.
        source_rows: i64,
        /// Rows at the target.
        target_rows: i64,
        /// Whether the checksums agree.
        checksums_match: bool,
    },
}

/// How many of a cutover's slots one database records in each state, at each version.
struct SlotStates(Vec<(String, i64, i64)>);

impl SlotStates {
    async fn read(pool: &PgPool, slots: &[i32]) -> Result<Self, CutoverError> {
        let rows = sqlx::query_as(
            "SELECT state, version, count(*) FROM stanchion_slot_owner
             WHERE slot = ANY($1) GROUP BY state, version",
        )
        .bind(slots)
        .fetch_all(pool)
        .await?;
        Ok(Self(rows))
    }

    /// Slots in `state` (at `version`, if given).
    fn count(&self, state: &str, version: Option<i64>) -> usize {
        self.0
            .iter()
            .filter(|(s, v, _)| s == state && version.is_none_or(|want| *v == want))
            .map(|(_, _, n)| usize::try_from(*n).unwrap_or(0))
            .sum()
    }
}

/// Runs `ddl` (a `CREATE TABLE IF NOT EXISTS`) under a transaction-scoped advisory lock, so
/// that processes creating the table at once (a fleet starting) wait for each other: run
/// concurrently, `IF NOT EXISTS` can still fail with "already exists".
pub(crate) async fn create_table(pool: &PgPool, ddl: &'static str) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('stanchion_shard_router:ddl'))")
        .execute(&mut *tx)
        .await?;
    sqlx::query(ddl).execute(&mut *tx).await?;
    tx.commit().await
}

/// Creates the ownership table and records `slots` as owned by this database at `version`
/// (for a new deployment; a cutover records moves itself). Safe to run from many processes at
/// once: the table is created under an advisory lock.
pub async fn install(pool: &PgPool, slots: &[u32], version: u64) -> Result<(), CutoverError> {
    create_table(pool, OWNER_TABLE_SQL).await?;
    sqlx::query(
        "INSERT INTO stanchion_slot_owner (slot, state, version)
         SELECT s, 'owned', $2 FROM unnest($1::integer[]) AS s
         ON CONFLICT (slot) DO UPDATE SET state = 'owned', version = excluded.version",
    )
    .bind(slot_array(slots))
    .bind(version_i64(version))
    .execute(pool)
    .await?;
    Ok(())
}

/// Call inside the writer's transaction before writing a row of `slot`: refuses unless this
/// database owns the slot, and holds a share lock on the slot's ownership until the
/// transaction ends (so a fence waits for this write to commit).
///
/// Returns [`RouteError::SlotMoved`] (reload the map: its version must be at least the one in
/// the error) or [`RouteError::SlotFenced`] (retry after a short wait) inside
/// [`CutoverError::Route`].
pub async fn guard_write(conn: &mut PgConnection, slot: u32) -> Result<(), CutoverError> {
    let row =
        sqlx::query("SELECT state, version FROM stanchion_slot_owner WHERE slot = $1 FOR SHARE")
            .bind(slot as i32)
            .fetch_optional(&mut *conn)
            .await?;
    let Some(row) = row else {
        return Err(RouteError::SlotMoved { slot, version: 0 }.into());
    };
    let state: String = row.try_get(0)?;
    let version: i64 = row.try_get(1)?;
    match state.as_str() {
        "owned" => Ok(()),
        "moved" => Err(RouteError::SlotMoved {
            slot,
            version: u64::try_from(version).unwrap_or(0),
        }
        .into()),
        _ => Err(RouteError::SlotFenced { slot }.into()),
    }
}

/// A table whose rows move with their slot.
#[derive(Debug, Clone)]
pub struct MovedTable {
    name: String,
    key: String,
    slot: String,
}

impl MovedTable {
    /// Table `name` with primary key column `key` and slot column `slot` (plain identifiers).
    pub fn new(name: &str, key: &str, slot: &str) -> Result<Self, CutoverError> {
        Ok(MovedTable {
            name: ident(name, "table")?,
            key: ident(key, "key column")?,
            slot: ident(slot, "slot column")?,
        })
    }
}

fn ident(s: &str, field: &'static str) -> Result<String, CutoverError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(s.to_string())
    } else {
        Err(CutoverError::BadIdentifier { field })
    }
}

/// What a cutover did and how long each step took.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct CutoverReport {
    /// Rows copied (or brought up to date) while writers went on.
    pub copied: u64,
    /// Rows brought over (changed, new or deleted) under the fence.
    pub synced: u64,
    /// Rows deleted from the source after the switch.
    pub released: u64,
    /// How long the slots were fenced (writes to them refused): fence to switch.
    pub fenced_for: Duration,
    /// The whole cutover.
    pub total: Duration,
}

/// Moves `slots` from `source` to `target` for the listed tables, ending at map `version`.
#[derive(Debug)]
pub struct Cutover {
    source: PgPool,
    target: PgPool,
    slots: Vec<u32>,
    version: u64,
    tables: Vec<MovedTable>,
    batch: i64,
}

impl Cutover {
    /// A cutover of `slots` to map `version` (the version of the map that assigns them to the
    /// target). Batches of 1,000 rows.
    pub fn new(
        source: PgPool,
        target: PgPool,
        slots: Vec<u32>,
        version: u64,
        tables: Vec<MovedTable>,
    ) -> Self {
        Cutover {
            source,
            target,
            slots,
            version,
            tables,
            batch: 1000,
        }
    }

    /// Rows per batch when copying and releasing (1 to 100,000).
    pub fn batch(mut self, rows: u32) -> Self {
        self.batch = i64::from(rows.clamp(1, 100_000));
        self
    }

    /// Runs every step; see the module documentation.
    pub async fn run(&self) -> Result<CutoverReport, CutoverError> {
        let started = Instant::now();
        let mut report = CutoverReport::default();
        let slots = slot_array(&self.slots);
        let all = self.slots.len();
        let new = version_i64(self.version);
        let source = SlotStates::read(&self.source, &slots).await?;
        // Owned, or fenced by an earlier run of a cutover that stopped before its switch (its
        // process died): running again picks up from there.
        let held = source.count("owned", None) + source.count("fenced", None);
        if held != all {
            // An earlier run that got through its switch and stopped while releasing: only
            // the release is left.
            if source.count("moved", Some(new)) == all
                && self.target_owns(&slots).await.unwrap_or(false)
            {
                report.released = self.release().await?;
                report.total = started.elapsed();
                return Ok(report);
            }
            return Err(CutoverError::NotOwner {
                owned: held,
                asked: all,
            });
        }
        // 1. prepare
        create_table(&self.target, OWNER_TABLE_SQL).await?;
        // A run that stopped inside its switch (the target took the slots, the source still
        // has them fenced) is finished from there: the target may already hold writes made
        // under the new map, which a new copy from the fenced source would undo. (A source
        // that still *owns* them goes through every step, whatever the target claims.)
        if source.count("fenced", None) == all && self.target_owns(&slots).await? {
            tracing::warn!(
                shard.slots = self.slots.len(),
                shard.version = self.version,
                "the target already owns the slots: finishing an interrupted switch"
            );
            self.mark_moved(&slots).await?;
            report.released = self.release().await?;
            report.total = started.elapsed();
            return Ok(report);
        }
        sqlx::query(
            "INSERT INTO stanchion_slot_owner (slot, state, version)
             SELECT s, 'incoming', $2 FROM unnest($1::integer[]) AS s
             ON CONFLICT (slot) DO UPDATE SET state = 'incoming', version = excluded.version",
        )
        .bind(&slots)
        .bind(version_i64(self.version))
        .execute(&self.target)
        .await?;
        // 2. copy, live; then one live sync pass, so the fenced sync has only the writes of
        // the last moments to bring over.
        let mut key_types = Vec::with_capacity(self.tables.len());
        for t in &self.tables {
            let ty = self.key_type(t).await?;
            report.copied += self.copy_live(t, &ty, &slots).await?;
            report.copied += self.sync(t, &ty, &slots).await?;
            key_types.push(ty);
        }
        // 3. fence
        let fenced = Instant::now();
        sqlx::query(
            "UPDATE stanchion_slot_owner SET state = 'fenced' WHERE slot = ANY($1) AND state = 'owned'",
        )
        .bind(&slots)
        .execute(&self.source)
        .await?;
        // 4. sync and 5. verify
        for (t, ty) in self.tables.iter().zip(&key_types) {
            report.synced += self.sync(t, ty, &slots).await?;
            self.verify(t, &slots).await?;
        }
        // 6. switch: the target first, so there is never a moment where nobody may write and
        // the source says the slots moved.
        sqlx::query(
            "UPDATE stanchion_slot_owner SET state = 'owned', version = $2 WHERE slot = ANY($1)",
        )
        .bind(&slots)
        .bind(version_i64(self.version))
        .execute(&self.target)
        .await?;
        self.mark_moved(&slots).await?;
        report.fenced_for = fenced.elapsed();
        tracing::info!(
            shard.slots = self.slots.len(),
            shard.version = self.version,
            shard.copied = report.copied,
            shard.synced = report.synced,
            shard.fenced_ms = u64::try_from(report.fenced_for.as_millis()).unwrap_or(u64::MAX),
            "slots switched to their new shard"
        );
        // 7. release
        report.released = self.release().await?;
        report.total = started.elapsed();
        Ok(report)
    }

    /// Whether the target owns every slot at the new version (its half of the switch is done).
    async fn target_owns(&self, slots: &[i32]) -> Result<bool, CutoverError> {
        let target = SlotStates::read(&self.target, slots).await?;
        Ok(target.count("owned", Some(version_i64(self.version))) == self.slots.len())
    }

    /// The source's half of the switch: the slots are marked moved at the new version.
    async fn mark_moved(&self, slots: &[i32]) -> Result<(), CutoverError> {
        sqlx::query(
            "UPDATE stanchion_slot_owner SET state = 'moved', version = $2 WHERE slot = ANY($1)",
        )
        .bind(slots)
        .bind(version_i64(self.version))
        .execute(&self.source)
        .await?;
        Ok(())
    }

    /// Deletes the moved rows from the source, in batches (step 7; safe to run again).
    pub async fn release(&self) -> Result<u64, CutoverError> {
        let slots = slot_array(&self.slots);
        let mut released = 0;
        for t in &self.tables {
            let sql = format!(
                "DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} WHERE {slot} = ANY($1) LIMIT $2)",
                table = t.name,
                key = t.key,
                slot = t.slot
            );
            loop {
                let n = sqlx::query(AssertSqlSafe(sql.clone()))
                    .bind(&slots)
                    .bind(self.batch)
                    .execute(&self.source)
                    .await?
                    .rows_affected();
                released += n;
                if n == 0 {
                    break;
                }
            }
        }
        Ok(released)
    }

    /// Undoes a cutover that failed before its switch: the source owns the slots again and the
    /// target's copies and incoming records are removed.
    pub async fn abort(&self) -> Result<(), CutoverError> {
        let slots = slot_array(&self.slots);
        sqlx::query(
            "UPDATE stanchion_slot_owner SET state = 'owned' WHERE slot = ANY($1) AND state = 'fenced'",
        )
        .bind(&slots)
        .execute(&self.source)
        .await?;
        for t in &self.tables {
            let sql = format!("DELETE FROM {} WHERE {} = ANY($1)", t.name, t.slot);
            sqlx::query(AssertSqlSafe(sql))
                .bind(&slots)
                .execute(&self.target)
                .await?;
        }
        sqlx::query("DELETE FROM stanchion_slot_owner WHERE slot = ANY($1) AND state = 'incoming'")
            .bind(&slots)
            .execute(&self.target)
            .await?;
        Ok(())
    }

    async fn key_type(&self, t: &MovedTable) -> Result<String, CutoverError> {
        let ty: String = sqlx::query_scalar(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
             WHERE attrelid = $1::regclass AND attname = $2 AND NOT attisdropped",
        )
        .bind(&t.name)
        .bind(&t.key)
        .fetch_one(&self.source)
        .await?;
        // From the catalogue; checked anyway before it goes into SQL text.
        if ty
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b" _()[],".contains(&b))
        {
            Ok(ty)
        } else {
            Err(CutoverError::BadIdentifier {
                field: "key column type",
            })
        }
    }

    async fn copy_live(
        &self,
        t: &MovedTable,
        ty: &str,
        slots: &[i32],
    ) -> Result<u64, CutoverError> {
        let page = format!(
            "SELECT {key}::text, to_jsonb(x)::text FROM {table} x
             WHERE {slot} = ANY($1) AND ($2::text IS NULL OR {key} > $2::text::{ty})
             ORDER BY {key} LIMIT $3",
            key = t.key,
            table = t.name,
            slot = t.slot
        );
        let mut after: Option<String> = None;
        let mut copied = 0;
        loop {
            let rows = sqlx::query(AssertSqlSafe(page.clone()))
                .bind(slots)
                .bind(&after)
                .bind(self.batch)
                .fetch_all(&self.source)
                .await?;
            let Some(last) = rows.last() else {
                return Ok(copied);
            };
            after = Some(last.try_get(0)?);
            let docs: Vec<String> = rows
                .iter()
                .map(|r| r.try_get(1))
                .collect::<Result<_, _>>()?;
            copied += self.insert(t, &docs, true).await?;
        }
    }

    /// Inserts rows given as JSON documents at the target; `keep` leaves rows already there.
    async fn insert(
        &self,
        t: &MovedTable,
        docs: &[String],
        keep: bool,
    ) -> Result<u64, CutoverError> {
        let sql = format!(
            "INSERT INTO {table} SELECT * FROM jsonb_populate_recordset(NULL::{table}, $1::text::jsonb) {conflict}",
            table = t.name,
            conflict = if keep { "ON CONFLICT DO NOTHING" } else { "" }
        );
        let array = format!("[{}]", docs.join(","));
        Ok(sqlx::query(AssertSqlSafe(sql))
            .bind(array)
            .execute(&self.target)
            .await?
            .rows_affected())
    }

    async fn digests(
        &self,
        pool: &PgPool,
        t: &MovedTable,
        slots: &[i32],
    ) -> Result<HashMap<String, String>, CutoverError> {
        let sql = format!(
            "SELECT {key}::text, md5(to_jsonb(x)::text) FROM {table} x WHERE {slot} = ANY($1)",
            key = t.key,
            table = t.name,
            slot = t.slot
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(slots)
            .fetch_all(pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    async fn sync(&self, t: &MovedTable, ty: &str, slots: &[i32]) -> Result<u64, CutoverError> {
        let source = self.digests(&self.source, t, slots).await?;
        let target = self.digests(&self.target, t, slots).await?;
        let stale: Vec<String> = target
            .iter()
            .filter(|(k, d)| source.get(*k) != Some(*d))
            .map(|(k, _)| k.clone())
            .collect();
        let missing: Vec<String> = source
            .iter()
            .filter(|(k, d)| target.get(*k) != Some(*d))
            .map(|(k, _)| k.clone())
            .collect();
        let delete = format!(
            "DELETE FROM {table} WHERE {key} = ANY($1::text[]::{ty}[])",
            table = t.name,
            key = t.key
        );
        for chunk in stale.chunks(self.batch as usize) {
            sqlx::query(AssertSqlSafe(delete.clone()))
                .bind(chunk)
                .execute(&self.target)
                .await?;
        }
        let fetch = format!(
            "SELECT to_jsonb(x)::text FROM {table} x WHERE {key} = ANY($1::text[]::{ty}[])",
            table = t.name,
            key = t.key
        );
        for chunk in missing.chunks(self.batch as usize) {
            let docs: Vec<String> = sqlx::query_scalar(AssertSqlSafe(fetch.clone()))
                .bind(chunk)
                .fetch_all(&self.source)
                .await?;
            self.insert(t, &docs, false).await?;
        }
        let mut keys: Vec<&String> = stale.iter().chain(&missing).collect();
        keys.sort();
        keys.dedup();
        Ok(keys.len() as u64)
    }

    async fn verify(&self, t: &MovedTable, slots: &[i32]) -> Result<(), CutoverError> {
        let sql = format!(
            "SELECT count(*), coalesce(md5(string_agg(md5(to_jsonb(x)::text), '' ORDER BY {key})), '')
             FROM {table} x WHERE {slot} = ANY($1)",
            key = t.key,
            table = t.name,
            slot = t.slot
        );
        let a = sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(slots)
            .fetch_one(&self.source)
            .await?;
        let b = sqlx::query(AssertSqlSafe(sql))
            .bind(slots)
            .fetch_one(&self.target)
            .await?;
        let (na, sa): (i64, String) = (a.try_get(0)?, a.try_get(1)?);
        let (nb, sb): (i64, String) = (b.try_get(0)?, b.try_get(1)?);
        if na != nb || sa != sb {
            return Err(CutoverError::Verify {
                table: t.name.clone(),
                source_rows: na,
                target_rows: nb,
                checksums_match: sa == sb,
            });
        }
        Ok(())
    }
}

fn slot_array(slots: &[u32]) -> Vec<i32> {
    // Slots are below MAX_SLOTS (2^16): they fit an integer column.
    slots.iter().map(|s| *s as i32).collect()
}

fn version_i64(version: u64) -> i64 {
    i64::try_from(version).unwrap_or(i64::MAX)
}
